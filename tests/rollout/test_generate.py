"""`rollout(...)` options with a real in-process engine and reward scorer: dynamic sampling, the overlong
filter and penalty, a custom generate function, failed and aborted generations."""

import asyncio
import itertools
from pathlib import Path

import pytest

from leagues.engine import SamplingParams
from leagues.engine.client import LocalClient
from leagues.loop.train import trainable
from leagues.rollout.data import Prompt
from leagues.rollout.generate import GenerateContext, RolloutConfig, load_generate_fn, rollout
from leagues.rollout.rewards import RewardConfig, RewardScorer
from leagues.types import SampleStatus

REWARDS = Path(__file__).parent / "rewards_for_rollout.py"


def prompts(labels):
    """A prompt source cycling through `labels` (one prompt per call slot)."""
    counter = itertools.count()

    def next_prompts(num: int) -> list[Prompt]:
        out = []
        for _ in range(num):
            i = next(counter)
            out.append(Prompt(index=i, prompt_ids=[5, 6, 7 + i % 20], text=f"p{i}", label=labels[i % len(labels)]))
        return out

    return next_prompts


def run(engine, cfg: RolloutConfig, labels, reward="by_prompt", generate_fn=None):
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.max_response_len, ignore_eos=True)
    ctx = GenerateContext(client=LocalClient(engine), params=params, tokenizer=engine.tokenizer, config=cfg)
    scorer = RewardScorer(RewardConfig(name=f"{REWARDS}:{reward}"))
    kwargs = {"generate_fn": generate_fn} if generate_fn else {}
    return asyncio.run(rollout(prompts(labels), cfg.batch_size, 0, ctx, scorer, **kwargs))


def test_dynamic_sampling_keeps_only_groups_whose_rewards_vary(engine):
    cfg = RolloutConfig(batch_size=2, n_samples_per_prompt=4, max_response_len=3, dynamic_sampling=True)
    result = run(engine, cfg, labels=["same", "mixed"])
    groups = {s.group_id for s in result.samples}
    # round 1 draws ("same", "mixed") and keeps one group; each further round draws one prompt for the slot
    # left: "same" (dropped), then "mixed" (kept)
    assert len(groups) == 2 and result.metrics["rollout/rounds"] == 3
    assert all(s.metadata["label"] == "mixed" for s in result.samples)
    assert result.metrics["rollout/num_generated"] == 16


def test_overlong_filter_masks_truncated_samples_and_penalty_lowers_their_reward(engine):
    cfg = RolloutConfig(batch_size=1, n_samples_per_prompt=2, max_response_len=4, overlong="filter")
    for s in run(engine, cfg, labels=["same"]).samples:
        assert s.status == SampleStatus.TRUNCATED and s.loss_mask == [0] * 4
    cfg = RolloutConfig(batch_size=1, n_samples_per_prompt=2, max_response_len=4, overlong="penalty", overlong_buffer=2)
    for s in run(engine, cfg, labels=["same"]).samples:
        assert s.reward == pytest.approx(1.0 - 1.0)  # 4 tokens: 2 past the buffer's start, the full penalty


def test_custom_generate_fn_failures_and_aborts(engine, tmp_path, monkeypatch):
    (tmp_path / "my_agent.py").write_text(
        "from leagues.rollout.generate import single_turn\n"
        "from leagues.types import SampleStatus\n"
        "async def generate(ctx, sample):\n"
        "    k = sample.metadata['seed'] % 3\n"
        "    if k == 0:\n"
        "        raise RuntimeError('tool crashed')\n"
        "    await single_turn(ctx, sample)\n"
        "    if k == 1:\n"
        "        sample.status = SampleStatus.ABORTED\n"
        "    sample.metadata['agent'] = True\n"
        "    return sample\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RolloutConfig(batch_size=2, n_samples_per_prompt=6, max_response_len=3, generate_fn="my_agent:generate")
    result = run(engine, cfg, labels=["same"], generate_fn=load_generate_fn(cfg.generate_fn))
    failed = [s for s in result.samples if s.status == SampleStatus.FAILED]
    aborted = [s for s in result.samples if s.status == SampleStatus.ABORTED]
    assert failed and aborted and result.metrics["rollout/failed"] == len(failed)
    assert all("tool crashed" in s.metadata["error"] for s in failed)
    assert all(s.metadata.get("agent") for s in result.samples if s.status != SampleStatus.FAILED)
    assert not set(map(id, trainable(result.samples))) & set(map(id, failed + aborted))
    with pytest.raises(ValueError, match="generate_fn"):
        load_generate_fn("my_agent:missing")
