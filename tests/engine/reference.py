"""Shared helpers of the engine tests: prompts, full-forward references, engine construction.

The references never go through the engine: one packed forward of the whole sequence with the same
leagues model (`Transformer.run`), so the paged cache, the scheduler and the sampler are all under test.
"""

import contextlib

import torch

from leagues.engine import Engine, Output, SamplingParams
from leagues.model import ForwardBatch, Transformer

GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)


def make_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in lengths]


@contextlib.contextmanager
def engine_of(model, **config):
    """An engine that is always closed."""
    engine = Engine(model, **config)
    try:
        yield engine
    finally:
        engine.close()


def generate_ids(engine: Engine, prompts, params: SamplingParams = GREEDY) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(prompts, params)]


@torch.no_grad()
def full_forward(model: Transformer, ids: list[int], capture_experts: bool = False):
    batch = ForwardBatch.packed(torch.tensor(ids), [len(ids)], capture_experts=capture_experts)
    return model.run(batch)


def reference_logprobs(model: Transformer, out: Output, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of the whole sequence's forward at every generated token (T := 1 if greedy)."""
    seq = out.prompt_token_ids + out.token_ids
    logits_TV = full_forward(model, seq[:-1]).logits_TV.float()
    num_prompt = len(out.prompt_token_ids)
    logprobs_OV = torch.log_softmax(logits_TV[num_prompt - 1 :] / (temperature or 1.0), dim=-1)
    return logprobs_OV.gather(1, torch.tensor(out.token_ids)[:, None]).squeeze(1)


def reference_routes(model: Transformer, out: Output) -> torch.Tensor:
    """Experts of the whole sequence minus its last token (the engine never computes the last one)."""
    seq = out.prompt_token_ids + out.token_ids
    return full_forward(model, seq[:-1], capture_experts=True).routed_experts_TLK
