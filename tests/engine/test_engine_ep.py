"""Expert-parallel engines (2 gloo ranks): each keeps half of every MoE layer's experts and its own requests;
their outputs equal a whole engine's, also when one of them is asleep with nothing to run, and full expert
weights loaded by name land as each engine's slice."""

import pytest
import torch
import torch.distributed as dist

from leagues.engine import Engine, SamplingParams
from leagues.model import load_pretrained, resolve_model_path
from tests.parallel.test_parallel import spawn

PROMPTS = {0: [[5, 17, 33, 42, 8], [9, 9, 12]], 1: [[70, 3, 3, 21, 40, 41, 7], [11], [12, 13, 14]]}
PARAMS = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
ENGINE = dict(device="cpu", num_blocks=64, block_size=4, max_num_batched_tokens=8)  # chunked prefill too


def assert_same_outputs(got, want, exact: bool = False) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        if exact:
            assert g.logprobs == w.logprobs
        else:
            assert torch.allclose(torch.tensor(g.logprobs), torch.tensor(w.logprobs), atol=1e-5)


def perturbed(path) -> list[tuple[str, torch.Tensor]]:
    model = load_pretrained(path)
    gen = torch.Generator().manual_seed(7)
    return [(n, p.detach() + 0.02 * torch.randn(p.shape, generator=gen)) for n, p in model.named_parameters()]


def ep_engines(rank: int) -> None:
    if rank == 0:
        resolve_model_path("tiny-moe")  # built once, before the other rank looks for it
    dist.barrier()
    path = resolve_model_path("tiny-moe")
    data, control = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
    whole = Engine(path, **ENGINE)
    want = whole.generate(PROMPTS[rank], PARAMS)
    want_alone = whole.generate(PROMPTS[1][:1], PARAMS)
    whole.load_weights(perturbed(path))
    want_new = whole.generate(PROMPTS[rank], PARAMS)
    whole.close()

    eng = Engine(path, ep_group=data, ep_control_group=control, **ENGINE)
    try:
        assert eng.model.layers[0].moe.experts.w13.shape[0] == eng.model.config.num_experts // 2
        assert_same_outputs(eng.generate(PROMPTS[rank], PARAMS), want)  # different batches on each rank
        if rank == 0:  # asleep (no cache) and with nothing to run, it still serves its experts to rank 1
            with pytest.raises(ValueError, match="keeps its weights"):
                eng.sleep(offload_weights=True)
            eng.sleep()
        dist.barrier()
        if rank == 1:
            assert_same_outputs(eng.generate(PROMPTS[1][:1], PARAMS), want_alone)
        dist.barrier()
        if rank == 0:
            eng.wake()
        eng.load_weights(perturbed(path))  # full experts by our names: each engine keeps its half
        dist.barrier()  # a peer's tokens must not reach experts still holding the old weights
        assert_same_outputs(eng.generate(PROMPTS[rank], PARAMS), want_new)
    finally:
        eng.close()


def test_expert_parallel_engines_match_a_whole_engine():
    spawn(ep_engines)


def ep_engines_deterministic(rank: int) -> None:
    if rank == 0:
        resolve_model_path("tiny-moe")
    dist.barrier()
    path, group = resolve_model_path("tiny-moe"), dist.new_group(backend="gloo")
    config = ENGINE | {"deterministic": True}
    whole = Engine(path, **config)
    want = whole.generate(PROMPTS[rank], PARAMS)
    whole.close()
    eng = Engine(path, ep_group=group, **config)
    try:  # experts on two ranks, other batches: the same bits (rows are batch-invariant, the top-k sum ordered)
        assert_same_outputs(eng.generate(PROMPTS[rank], PARAMS), want, exact=True)
    finally:
        eng.close()


def test_deterministic_expert_parallel_engines_equal_a_whole_engine_bit_for_bit():
    spawn(ep_engines_deterministic)
