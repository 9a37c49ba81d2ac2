"""`leagues eval`: accuracy of a model on a built-in task's held-out split or a prompt file, with its reward.

Greedy by default (temperature 0, one sample); with `n` > 1 and a temperature it reports the mean reward
over samples (pass@1) and pass@n. Prints one JSON line; `--out FILE` also writes every response as JSONL.
Data and reward are checked before the model loads; samples whose reward failed are counted on stderr, and a
reward that fails on every sample is an error (exit 2), not an accuracy of 0.
"""

import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leagues.cli import UsageError
from leagues.engine import Engine, EngineConfig
from leagues.engine.client import LocalClient
from leagues.loop.config import EvalConfig, TrainConfig
from leagues.loop.run import datasets
from leagues.model import load_tokenizer, resolve_model_path
from leagues.rollout import DataConfig, RewardConfig, RewardError, RewardScorer
from leagues.types import Sample, SamplingParams


@dataclass(kw_only=True, slots=True)
class EvalVerbConfig:
    model: str = "tiny-moe"
    task: str = ""
    """A built-in task: its test split and its reward."""
    task_params: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    """Or a prompt file (with labels) and a reward."""
    reward: RewardConfig | None = None
    num_prompts: int = 256
    """Held-out prompts of the task (a data file is used whole)."""
    n: int = 1
    temperature: float = 0.0
    max_response_len: int = 64
    seed: int = 0
    out: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)


def run_eval(cfg: EvalVerbConfig) -> int:
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path)
    as_run = TrainConfig(
        task=cfg.task, task_params=cfg.task_params, data=cfg.data, reward=cfg.reward, seed=cfg.seed,
        eval=EvalConfig(every=1, num_prompts=cfg.num_prompts),
    )  # fmt: skip
    try:
        train_data, held_out, reward = datasets(as_run, tokenizer)
        scorer = RewardScorer(reward)  # a reward that cannot load or be called fails before the model loads
    except ValueError as e:
        raise UsageError(str(e)) from None
    prompts = list(held_out if held_out is not None else train_data)
    engine = Engine(path, tokenizer, cfg.engine)
    params = SamplingParams(temperature=cfg.temperature, n=cfg.n, seed=cfg.seed, max_new_tokens=cfg.max_response_len)
    try:
        samples = asyncio.run(_generate(LocalClient(engine), prompts, params))
    finally:
        engine.close()
    with scorer:
        stats = scorer.score_sync(samples)
    try:
        stats.raise_if_none_scored(reward.name)
    except RewardError as e:
        raise UsageError(str(e)) from None
    if stats.failed:
        print(f"eval: the reward failed on {stats.failed} of {len(samples)} samples; first: {stats.first_error}",
              file=sys.stderr)  # fmt: skip
    passed = [s.reward >= 1.0 for s in samples]
    by_group = [any(passed[g * cfg.n : (g + 1) * cfg.n]) for g in range(len(prompts))]
    result = {"prompts": len(prompts), "accuracy": sum(passed) / max(len(passed), 1)}
    result |= {f"pass@{cfg.n}": sum(by_group) / max(len(by_group), 1)} if cfg.n > 1 else {}
    print(json.dumps(result))
    if cfg.out:
        rows = [{"prompt": s.metadata["prompt_text"], "response": s.metadata["response_text"], "reward": s.reward}
                for s in samples]  # fmt: skip
        Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


async def _generate(client: LocalClient, prompts, params: SamplingParams) -> list[Sample]:
    async def one(g: int, prompt) -> list[Sample]:
        outs = await client.generate(list(prompt.prompt_ids), params)
        meta = {"prompt_text": prompt.text, "label": prompt.label} | prompt.metadata
        return [
            Sample(prompt_ids=list(prompt.prompt_ids), response_ids=list(o.token_ids), group_id=g,
                   metadata=meta | {"response_text": o.text})
            for o in outs
        ]  # fmt: skip

    groups = await asyncio.gather(*(one(g, p) for g, p in enumerate(prompts)))
    return [s for group in groups for s in group]
