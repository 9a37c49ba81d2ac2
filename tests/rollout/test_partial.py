"""Partial rollout and over-sampling with the real tiny engine: a step returns exactly its complete groups and
carries the rest; a carried sample continues where it stopped (its tokens, logprobs and routes are both
requests' own, the continuation exactly what the engine gives for prompt + partial response), each token keeps
the weights version that sampled it, older tokens are masked or kept, the carried state survives a
checkpoint's `torch.load(weights_only=True)`, and bad option combinations are refused."""

import asyncio
import copy
import io
import itertools
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from leagues.engine import SamplingParams
from leagues.engine.client import HTTPClient, LocalClient
from leagues.loop import TrainConfig
from leagues.model import load_pretrained
from leagues.rollout.data import Prompt
from leagues.rollout.generate import GenerateContext, RolloutConfig, rollout
from leagues.rollout.partial import FINISHED, PartialRollout, continuation_seed
from leagues.rollout.rewards import RewardConfig, RewardScorer
from leagues.types import SampleStatus

REWARDS = Path(__file__).parent / "rewards_for_rollout.py"
MAX_LEN = 160  # long enough that eos (about 1 token in 100 from the untrained model) ends groups at different times


def prompts():
    counter = itertools.count()
    return lambda num: [
        Prompt(index=i, prompt_ids=[5, 6, 7 + i % 20], text=f"p{i}") for i in itertools.islice(counter, num)
    ]


def step(engine, carry, num_groups, cfg, step_index=0, next_prompts=None):
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.max_response_len, return_routed_experts=True)
    ctx = GenerateContext(client=LocalClient(engine), params=params, tokenizer=engine.tokenizer, config=cfg)
    scorer = RewardScorer(RewardConfig(name=f"{REWARDS}:by_prompt"))
    coro = rollout(next_prompts or prompts(), num_groups, step_index, ctx, scorer, seed=3, partial=carry)
    return asyncio.run(coro)


def new_weights(engine, tiny_path, version: int) -> None:
    """Perturbed weights into the engine as `version` (continuations must run under them)."""
    torch.manual_seed(version)
    model = load_pretrained(tiny_path)
    engine.load_weights([(n, p.detach() + 0.05 * torch.randn_like(p)) for n, p in model.named_parameters()], version)


def by_group(samples):
    groups = {}
    for s in samples:
        groups.setdefault(s.group_id, []).append(s)
    return groups


def test_over_sampling_returns_exactly_the_complete_groups_and_carries_the_rest(engine):
    cfg = RolloutConfig(n_samples_per_prompt=2, max_response_len=MAX_LEN, partial=True, over_sample=3.0)
    carry = PartialRollout()
    result = step(engine, carry, num_groups=1, cfg=cfg)
    returned, carried = by_group(result.samples), by_group(carry.carried)
    assert result.metrics["rollout/new_groups"] == 4  # ceil(1 x (1 + 3))
    assert len(returned) == 1 and all(s.status in FINISHED for s in result.samples)
    assert sorted(returned | carried) == [0, 1, 2, 3] and all(len(g) == 2 for g in (returned | carried).values())
    unfinished = [s for s in carry.carried if s.status not in FINISHED]
    assert unfinished and all(s.status == SampleStatus.ABORTED for s in unfinished)
    assert result.metrics["rollout/carried"] == 6 and result.metrics["rollout/aborted"] == len(unfinished)
    assert all(0 < len(s.response_ids) < MAX_LEN for s in unfinished)  # stopped early, with tokens to continue


@pytest.mark.parametrize("mask_old", [True, False])
def test_carried_samples_continue_where_they_stopped_under_the_new_weights(engine, tiny_path, mask_old):
    cfg = RolloutConfig(
        n_samples_per_prompt=2, max_response_len=MAX_LEN, partial=True, over_sample=3.0, partial_mask_old=mask_old
    )
    carry = PartialRollout()
    first_version = engine.weight_version
    step(engine, carry, num_groups=1, cfg=cfg)
    old = {(s.group_id, s.metadata["seed"]): s for s in copy.deepcopy(carry.carried)}
    carry.load_state_dict(roundtrip(carry.state_dict()))  # as a checkpoint keeps it: what continues is what it read
    new_weights(engine, tiny_path, first_version + 1)
    # every carried group must finish: ask for all of them and start no new one
    # groups that completed after the batch was full have only old tokens: dropped when those are masked
    spent = {g for g, members in by_group(old.values()).items() if all(s.status in FINISHED for s in members)}
    spent = spent if mask_old else set()
    num_groups = len(by_group(carry.carried)) - len(spent)
    result = step(engine, carry, num_groups, replace(cfg, over_sample=0.0), step_index=1)
    assert not carry.carried and result.metrics["rollout/new_groups"] == 0
    assert result.metrics["rollout/dropped_groups"] == len(spent)
    assert len(result.samples) == sum(g not in spent for g, _ in old)
    continued = 0
    for s in result.samples:
        prev = old[(s.group_id, s.metadata["seed"])]
        k = len(prev.response_ids)
        assert s.response_ids[:k] == prev.response_ids and s.rollout_logprobs[:k] == prev.rollout_logprobs
        assert s.token_versions == [first_version] * k + [first_version + 1] * (len(s.response_ids) - k)
        assert s.weight_version == first_version
        assert s.routed_experts.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1
        assert torch.equal(s.routed_experts[: prev.routed_experts.shape[0]], prev.routed_experts)
        if prev.status in FINISHED:
            assert len(s.response_ids) == k
        else:  # the continuation is the engine's own output on prompt + partial response, under the new weights
            continued += 1
            params = SamplingParams(
                temperature=1.0, max_new_tokens=MAX_LEN - k, seed=continuation_seed(prev.metadata["seed"], k)
            )
            out = engine.generate([prev.prompt_ids + prev.response_ids], params)[0]
            assert s.response_ids[k:] == out.token_ids and out.weight_version == first_version + 1
            assert s.rollout_logprobs[k:] == pytest.approx(out.logprobs, abs=1e-4)
        expected = [0] * k + [1] * (len(s.response_ids) - k) if mask_old else None
        assert s.loss_mask == expected
    assert continued
    assert result.metrics["rollout/carried_age_max"] == 1 and result.metrics["rollout/stale_token_frac"] > 0


def roundtrip(state: dict) -> dict:
    """`state` through `torch.save` and `torch.load(weights_only=True)`, as a checkpoint's extra goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_over_http_requests_are_aborted_by_id(tmp_path):
    """The same step against `leagues serve`: requests named by `rid`, aborted through `/abort_request`. A second
    URL where nothing listens makes every other request fail first: each is retried on the live engine, counted
    in `rollout/retried`, and no sample is lost."""
    cmd = [sys.executable, "-m", "leagues.cli", "serve", "--port", "0", "--engine.num_blocks", "256"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = next(m.group(1) for line in server.stdout if (m := re.search(r"listening on (http://\S+)", line)))
        cfg = RolloutConfig(n_samples_per_prompt=2, max_response_len=MAX_LEN, partial=True, over_sample=3.0)
        carry = PartialRollout()

        async def one_step():
            with socket.socket() as s:  # a port nothing listens on
                s.bind(("127.0.0.1", 0))
                dead = f"http://127.0.0.1:{s.getsockname()[1]}"
            client = HTTPClient([dead, url])
            ctx = GenerateContext(client, SamplingParams(temperature=1.0, max_new_tokens=MAX_LEN), None, cfg)
            scorer = RewardScorer(RewardConfig(name=f"{REWARDS}:by_prompt"))
            result = await rollout(prompts(), 1, 0, ctx, scorer, seed=3, partial=carry)
            version = await client.weight_version()
            await client.aclose()
            return result, version

        result, version = asyncio.run(one_step())
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert version == 0 and len(result.samples) == 2 and len(carry.carried) == 6
    assert result.metrics["rollout/retried"] > 0
    aborted = [s for s in carry.carried if s.status == SampleStatus.ABORTED]
    assert aborted and result.metrics["rollout/aborted"] == len(aborted)
    assert all(0 < len(s.response_ids) < MAX_LEN and len(s.rollout_logprobs) == len(s.response_ids) for s in aborted)


def test_bad_option_combinations_are_refused():
    with pytest.raises(ValueError, match="over_sample: extra groups need partial"):
        RolloutConfig(over_sample=0.5)
    with pytest.raises(ValueError, match="over_sample: must be >= 0"):
        RolloutConfig(partial=True, over_sample=-0.5)
    with pytest.raises(ValueError, match="partial: not with dynamic_sampling"):
        RolloutConfig(partial=True, dynamic_sampling=True)
    with pytest.raises(ValueError, match="partial: not with a custom generate_fn"):
        RolloutConfig(partial=True, generate_fn="my_agent:generate")
    with pytest.raises(ValueError, match="rollout.partial: not with --deterministic"):
        TrainConfig(rollout=RolloutConfig(partial=True), deterministic=True)
    with pytest.raises(ValueError, match="rollout.partial: colocated runs only"):
        TrainConfig(rollout=RolloutConfig(partial=True), placement="disaggregated")


def test_partial_rollout_needs_its_state(engine):
    with pytest.raises(ValueError, match="pass the carried samples' state"):
        step(engine, None, 1, RolloutConfig(partial=True, n_samples_per_prompt=1, max_response_len=2))
