"""The trajectory ledger on a real engine: a three-turn trajectory whose every request is exactly the ledger,
turned into one Sample whose loss mask is 1 on the sampled tokens only, whose logprobs are the engine's, and
whose routes cover every token of every turn (against a full forward of the whole trajectory)."""

import pytest
import torch

from leagues.agent.ledger import Ledger, LedgerError, Termination
from leagues.engine import SamplingParams
from leagues.model import ForwardBatch, load_pretrained, resolve_model_path
from leagues.types import SampleStatus


def test_a_multi_turn_trajectory_becomes_one_token_exact_sample(engine):
    ledger = Ledger([5, 6, 7, 8])
    params = SamplingParams(temperature=1.0, max_new_tokens=5, ignore_eos=True, seed=3, return_routed_experts=True)
    observations = [[40, 41], [50]]
    for turn in range(3):
        request = list(ledger.token_ids)
        ledger.check_request(request)
        out = engine.generate([request], params)[0]
        ledger.append_sampled(out.token_ids, out.logprobs, out.weight_version)
        ledger.add_routes(out.routed_experts)  # whole records: only the new rows are kept
        if turn < 2:
            ledger.append_context(observations[turn])
    sample = ledger.to_sample(Termination.MAX_TURNS, reward=1.0)
    assert sample.status == SampleStatus.TRUNCATED and sample.metadata["num_turns"] == 3
    assert sample.prompt_ids == [5, 6, 7, 8] and len(sample.response_ids) == 3 * 5 + 3
    # mask 1 exactly on the engine's tokens: 5 sampled, 2 observed, 5 sampled, 1 observed, 5 sampled
    assert sample.loss_mask == [1] * 5 + [0] * 2 + [1] * 5 + [0] + [1] * 5
    assert sample.metadata["token_turns"] == [0] * 5 + [1] * 2 + [1] * 5 + [2] + [2] * 5
    # the engine's logprobs of the sampled tokens equal a full forward of the whole trajectory (float32)
    model = load_pretrained(resolve_model_path("tiny-moe"), dtype=torch.float32)
    ids = sample.prompt_ids + sample.response_ids
    with torch.no_grad():
        out = model.run(ForwardBatch.packed(torch.tensor(ids[:-1]), [len(ids) - 1], capture_experts=True))
    want = out.logits_TV.float().log_softmax(-1)[3:].gather(1, torch.tensor(ids[4:])[:, None])[:, 0]
    mask = torch.tensor(sample.loss_mask, dtype=torch.bool)
    torch.testing.assert_close(torch.tensor(sample.rollout_logprobs)[mask], want[mask], rtol=0, atol=1e-5)
    assert torch.equal(sample.routed_experts, out.routed_experts_TLK.to(sample.routed_experts.dtype))


def test_a_request_that_differs_from_the_ledger_is_refused_naming_the_position():
    ledger = Ledger([5, 6, 7])
    ledger.append_sampled([9, 10], [-0.5, -1.0], weight_version=2)
    with pytest.raises(LedgerError, match="token 3 of 5"):
        ledger.check_request([5, 6, 7, 11, 10])  # a re-tokenized turn
    with pytest.raises(LedgerError, match="token 5 of 5"):
        ledger.check_request([5, 6, 7, 9, 10, 4])  # an extra token the ledger never got
    with pytest.raises(LedgerError, match="logprobs"):
        ledger.append_sampled([1, 2], [0.0], weight_version=2)


def test_terminations_map_to_statuses_and_routes_must_cover_the_trajectory():
    ledger = Ledger([5, 6])
    ledger.append_sampled([7], [-0.1], weight_version=4)
    assert ledger.to_sample(Termination.ABORT).status == SampleStatus.ABORTED
    assert ledger.to_sample("done").weight_version == 4
    ledger.append_context([8])
    ledger.add_routes(torch.zeros(1, 2, 2), start=0)
    with pytest.raises(LedgerError, match="routes cover 1 tokens"):
        ledger.to_sample(Termination.DONE)
    with pytest.raises(LedgerError, match="leave a gap"):
        ledger.add_routes(torch.zeros(1, 2, 2), start=2)
    ledger.add_routes(torch.ones(2, 2, 2), start=1)  # a delta from the first token without a row
    assert ledger.to_sample(Termination.DONE).routed_experts.sum() == 8
    with pytest.raises(LedgerError, match="routes cover 4 tokens"):
        ledger.add_routes(torch.ones(4, 2, 2), start=0)
    with pytest.raises(LedgerError, match="routes cover"):
        ledger.add_routes(torch.ones(4, 2, 2))  # ending at the last routed token, it would start before token 0
