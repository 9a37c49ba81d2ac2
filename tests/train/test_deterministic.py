"""Deterministic mode on the CPU: the engine's logprobs for a batch of mixed-length samples equal the
trainer's packed forward bit for bit, with its decode steps launched (sampled in the step) and overlapped or not,
and a request's logprobs do not depend on what shares its batch."""

import pytest
import torch

from leagues.engine import Engine, SamplingParams
from leagues.model import load_pretrained, resolve_model_path
from leagues.train import Trainer, TrainerConfig
from leagues.types import Sample

PROMPTS = [[5, 17, 33, 42, 8], [9, 9, 12], [70, 3, 3, 3, 3, 3, 21, 40, 41], [11]]


NUM_NEW_TOKENS = [7, 3, 11, 5]
"""Per request: sequences finish at different steps, so the launched steps' batches shrink."""


def engine(overlap: str = "false") -> Engine:
    # block size 4: keys span several blocks; chunked prefill cuts long prompts into 8-token chunks
    path = resolve_model_path("tiny-moe")
    return Engine(path, num_blocks=128, block_size=4, device="cpu", dtype="float32", deterministic=True,
                  max_num_batched_tokens=8, overlap_scheduling=overlap)  # fmt: skip


def sample(prompts, eng: Engine):
    lengths = NUM_NEW_TOKENS[: len(prompts)]
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=n, ignore_eos=True) for i, n in enumerate(lengths)]
    return eng.generate(prompts, params)


@pytest.mark.parametrize("overlap", ["false", "true"])
def test_engine_logprobs_equal_the_trainers_bit_for_bit(overlap):
    eng = engine(overlap)
    try:
        outs = sample(PROMPTS, eng)
        stats = dict(eng.stats)
    finally:
        eng.close()
    # the decode steps were launched: sampled in the step, logprobs by `sampler.invariant_logprobs`
    assert stats["launched_steps"] >= max(NUM_NEW_TOKENS) - 1  # every decode step of the longest request
    assert (stats["overlapped_steps"] > 0) == (overlap == "true")
    trainer = Trainer(resolve_model_path("tiny-moe"), TrainerConfig(), deterministic=True)
    samples = [Sample(prompt_ids=p, response_ids=o.token_ids) for p, o in zip(PROMPTS, outs, strict=True)]
    for got, out in zip(trainer.compute_logprobs(samples), outs, strict=True):
        assert torch.equal(torch.tensor(out.logprobs, dtype=torch.float32), got)


def test_a_requests_logprobs_do_not_depend_on_its_batch():
    eng = engine()
    try:
        alone = sample(PROMPTS[:1], eng)[0]
        crowded = sample(PROMPTS, eng)[0]
    finally:
        eng.close()
    assert alone.token_ids == crowded.token_ids
    assert alone.logprobs == crowded.logprobs  # exactly


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
def test_gpu_bf16_engine_logprobs_equal_the_trainers_bit_for_bit(graphs):
    path = resolve_model_path("tiny-moe")
    eng = Engine(path, num_blocks=128, block_size=4, device="cuda", dtype="bfloat16", deterministic=True,
                 max_num_batched_tokens=8, cuda_graphs=graphs)  # fmt: skip
    try:
        outs = sample(PROMPTS, eng)
        alone = sample(PROMPTS[:1], eng)[0]
    finally:
        eng.close()
    assert alone.logprobs == outs[0].logprobs
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    trainer = Trainer(model, TrainerConfig(), deterministic=True)
    samples = [Sample(prompt_ids=p, response_ids=o.token_ids) for p, o in zip(PROMPTS, outs, strict=True)]
    for got, out in zip(trainer.compute_logprobs(samples), outs, strict=True):
        assert torch.equal(torch.tensor(out.logprobs, dtype=torch.float32), got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_overlapped_graph_steps_give_the_trainers_logprobs_bit_for_bit():
    """CUDA graphs sample the deterministic decode steps (logprobs by the trainer's arithmetic, inside the graph);
    overlapped or not, the engine's logprobs equal the trainer's bit for bit, and each other's."""
    path = resolve_model_path("tiny-moe")
    runs = {}
    for overlap in ("false", "true"):
        eng = Engine(path, num_blocks=128, block_size=4, device="cuda", dtype="bfloat16", deterministic=True,
                     max_num_batched_tokens=8, cuda_graphs=True, overlap_scheduling=overlap)  # fmt: skip
        try:
            assert eng.runner.graphs
            runs[overlap] = sample(PROMPTS, eng), dict(eng.stats)
        finally:
            eng.close()
    (waiting, waiting_stats), (overlapped, overlapped_stats) = runs["false"], runs["true"]
    assert waiting_stats["launched_steps"] >= max(NUM_NEW_TOKENS) - 1 and waiting_stats["overlapped_steps"] == 0
    assert overlapped_stats["overlapped_steps"] > 0
    assert [(o.token_ids, o.logprobs) for o in overlapped] == [(o.token_ids, o.logprobs) for o in waiting]
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda")
    trainer = Trainer(model, TrainerConfig(), deterministic=True)
    samples = [Sample(prompt_ids=p, response_ids=o.token_ids) for p, o in zip(PROMPTS, overlapped, strict=True)]
    for got, out in zip(trainer.compute_logprobs(samples), overlapped, strict=True):
        assert torch.equal(torch.tensor(out.logprobs, dtype=torch.float32), got)
