"""Deterministic mode on the CPU: the engine's logprobs for a batch of mixed-length samples equal the
trainer's packed forward bit for bit, and a request's logprobs do not depend on what shares its batch."""

import pytest
import torch

from leagues.engine import Engine, SamplingParams
from leagues.model import load_pretrained, resolve_model_path
from leagues.train import Trainer, TrainerConfig
from leagues.types import Sample

PROMPTS = [[5, 17, 33, 42, 8], [9, 9, 12], [70, 3, 3, 3, 3, 3, 21, 40, 41], [11]]


def engine() -> Engine:
    # block size 4: keys span several blocks; chunked prefill cuts long prompts into 8-token chunks
    path = resolve_model_path("tiny-moe")
    return Engine(path, num_blocks=128, block_size=4, device="cpu", dtype="float32", deterministic=True,
                  max_num_batched_tokens=8)  # fmt: skip


def sample(prompts, eng: Engine):
    params = [SamplingParams(temperature=1.0, seed=i, max_new_tokens=7, ignore_eos=True) for i in range(len(prompts))]
    return eng.generate(prompts, params)


def test_engine_logprobs_equal_the_trainers_bit_for_bit():
    eng = engine()
    try:
        outs = sample(PROMPTS, eng)
    finally:
        eng.close()
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
