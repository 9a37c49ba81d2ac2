"""The ragged step graphs (`leagues.engine.prefill_graphs.RaggedGraphs`) on the CPU: what a replay computes, run
eagerly over the graphs' persistent buffers (padding rows, a block-table row per token, sampled rows), inside
the engine. Prompts after a cached prefix, later chunks of a long prompt and mixed steps give a float32 full
forward's logprobs and routes, and an engine without the graphs' tokens. The graphs themselves (capture and
replay on CUDA, the fresh kind) are checked in `test_engine_gpu.py`."""

import torch

from leagues.engine import SamplingParams
from leagues.engine.prefill_graphs import RaggedGraphs

from .reference import engine_of, make_prompts, reference_logprobs, reference_routes
from .test_mixed_steps import staggered

PARAMS = SamplingParams(temperature=1.0, seed=7, max_new_tokens=6, ignore_eos=True, return_routed_experts=True)


class EagerRagged(RaggedGraphs):
    """Every bucket "captured"; a replay runs the graph's step eagerly (no CUDA graphs on the CPU)."""

    def __init__(self, runner, max_tokens: int, max_seqs: int) -> None:
        super().__init__(runner, max_tokens, max_seqs)
        self.graphs = dict.fromkeys(self.buckets)
        self.sizes: list[int] = []

    def replay(self, bucket: int, num_rows: int) -> torch.Tensor:
        self.replays += 1
        self.sizes.append(bucket)
        with torch.inference_mode():
            self.upload()
            return self.step(bucket)["logits"][:num_rows].float()


def with_ragged(engine) -> EagerRagged:
    engine.runner.ragged_graphs = EagerRagged(engine.runner, 64, engine.config.max_num_seqs)
    return engine.runner.ragged_graphs


def _check(model, outputs, plain) -> None:
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain]
    for out in outputs:
        want = reference_logprobs(model, out, 1.0)
        torch.testing.assert_close(torch.tensor(out.logprobs), want, rtol=0, atol=1e-4)
        assert torch.equal(out.routed_experts, reference_routes(model, out).to(out.routed_experts.dtype))


def test_cached_prefixes_and_later_chunks_replay_the_ragged_graphs(engine, tiny_path):
    prompts = make_prompts([40, 21, 100], 101, seed=71)
    runs, graphs = {}, []
    for use in (True, False):
        with engine_of(tiny_path, num_blocks=128, block_size=16, max_num_batched_tokens=64) as e:
            if use:
                graphs.append(with_ragged(e))
            # the second round finds the first one's full blocks cached; the 100-token prompt comes in two chunks
            runs[use] = [out for _ in range(2) for out in e.generate(prompts, PARAMS)]
    ragged = graphs[0]
    assert ragged.replays >= 3 and set(ragged.sizes) <= {16, 32, 64}
    _check(engine.model, runs[True], runs[False])


def test_mixed_steps_replay_the_ragged_graphs(engine):
    graphs = []
    mixed, steps, on = staggered(engine.model, True, PARAMS, prepare=lambda e: graphs.append(with_ragged(e)))
    apart, _, _ = staggered(engine.model, False, PARAMS)
    assert on and graphs[0].replays >= 3  # the three arrivals' steps, each with the running requests' rows
    assert all(s == list(range(s[0], s[0] + len(s))) for s in steps)
    _check(engine.model, mixed, apart)
