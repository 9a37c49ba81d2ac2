"""The README's lookup figure: reward and held-out accuracy of a `tiny-lookup` run beside its no-tool control.

    leagues train --recipe tiny-lookup --run_dir runs/lookup
    leagues train --recipe tiny-lookup --task_params '{value_digits: 1, tools: false}' --run_dir runs/lookup-control
    python docs/lookup_figure.py runs/lookup runs/lookup-control docs/lookup-reward.png

The control can reuse the first run's warm start (copy `runs/lookup/warm_start` into its run directory first):
its demonstrations are the same.
"""

import json
import sys
from pathlib import Path

from matplotlib.figure import Figure


def rows(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def series(data: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in data if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def main(tool_dir: str, control_dir: str, out: str) -> None:
    fig = Figure(figsize=(9, 3.6))
    left, right = fig.subplots(1, 2)
    for run_dir, label, color in ((tool_dir, "with the lookup tool", "C0"), (control_dir, "no-tool control", "C3")):
        data = rows(run_dir)
        left.plot(*series(data, "rollout/reward_mean"), color=color, label=label)
        right.plot(*series(data, "eval/accuracy"), "o-", color=color, label=label)
    left.set(title="rollout reward (success), per step", xlabel="GRPO step", ylim=(0, 1))
    right.set(title="held-out greedy accuracy", xlabel="GRPO step", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:4])
