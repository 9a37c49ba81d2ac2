"""Packing into micro-batches, rank balancing, and chunked logprobs against a plain log-softmax."""

import torch

from leagues.train.logprobs import token_logprobs
from leagues.train.packing import balance, build_microbatch, split_by_tokens
from leagues.types import Sample


def test_split_by_tokens_respects_budget_and_keeps_every_index():
    lengths = [5, 9, 3, 12, 1, 7, 7]
    bins = split_by_tokens(lengths, 12)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in bins)
    assert split_by_tokens([20, 3], 10) == [[0], [1]]  # longer than the budget: its own micro-batch


def test_balance_spreads_tokens_evenly():
    lengths = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    shares = balance(lengths, 2)
    loads = [sum(lengths[i] for i in s) for s in shares]
    assert sorted(i for s in shares for i in s) == list(range(10)) and abs(loads[0] - loads[1]) <= 1


def test_microbatch_layout_scores_response_tokens_only():
    samples = [
        Sample(prompt_ids=[1, 2, 3], response_ids=[4, 5], advantage=0.5, rollout_logprobs=[-1.0, -2.0]),
        Sample(
            prompt_ids=[7], response_ids=[8, 9, 10], loss_mask=[1, 0, 1], advantage=-1.0, rollout_logprobs=[-3.0] * 3
        ),
    ]
    mb = build_microbatch(samples, [0, 1], "cpu")
    assert mb.lengths == [4, 3]
    assert mb.input_ids_T.tolist() == [1, 2, 3, 4, 7, 8, 9]
    assert mb.targets_T.tolist() == [2, 3, 4, 5, 8, 9, 10]
    assert mb.mask_T.tolist() == [0, 0, 1, 1, 1, 0, 1]
    assert mb.seq_ids_T.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert mb.rollout_logprobs_T.tolist() == [0, 0, -1, -2, -3, -3, -3]
    assert mb.advantages_T.tolist() == [0.5] * 4 + [-1.0] * 3


def test_chunked_logprobs_equal_full_log_softmax_with_grads():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=gen)
    lp, ent = token_logprobs(
        hidden, weight, targets, temperature=0.7, chunk_size=8, with_entropy=True, entropy_grad=True
    )
    full = torch.log_softmax((hidden @ weight.T) / 0.7, dim=-1)
    ref = full.gather(1, targets[:, None])[:, 0]
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), rtol=0, atol=1e-5)
    grads = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    ref_grads = torch.autograd.grad(ref.sum() - (full.exp() * full).sum(), (hidden, weight))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # As a metric (the default), entropy carries no gradient; logprobs keep theirs.
    lp, ent = token_logprobs(hidden, weight, targets, temperature=0.7, chunk_size=8, with_entropy=True)
    assert lp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), rtol=0, atol=1e-5)
