"""A reward for the disaggregated tests that also records what each trainer rank learns from.

Loaded by path in every rank of a `leagues train` job (`--reward.name tests/loop/record_shares.py:starts_with_one`),
it wraps the disaggregated loop's `learn` so that, when LEAGUES_TEST_RECORD=DIR is set, each trainer rank appends
one JSON line per step to DIR/rank-R.jsonl: the step and, for each sample of its share, its group id, reward,
advantage (as the loop assigned them) and prompt ids. The test then checks the shares from outside the job.
"""

import json
import os
from pathlib import Path

from leagues.loop import disaggregated

_learn = disaggregated.learn


def recording_learn(run, samples):
    metrics = _learn(run, samples)
    out = os.environ.get("LEAGUES_TEST_RECORD")
    if out:
        rows = [[s.group_id, s.reward, s.advantage, list(s.prompt_ids)] for s in samples]
        with (Path(out) / f"rank-{run.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"step": run.trainer.step, "samples": rows}) + "\n")
    return metrics


disaggregated.learn = recording_learn


def starts_with_one(prompt: str, response: str, label, metadata: dict) -> float:
    return 1.0 if response.startswith("1") else 0.0
