"""Plots of a run's metrics rows: reward, response lengths, time breakdown, train/rollout mismatch.

Where it sits: `report.write_report` reads `metrics.jsonl` into rows (one dict per step) and calls each
function of `PLOTS`; each returns a matplotlib `Figure`, or None when the run logged none of its keys
(the report then notes the plot as skipped).

Decisions:
- Figures are built with `matplotlib.figure.Figure`, never `pyplot`: no global backend switch, no global
  figure list to leak, safe inside a training process or a notebook. Saving to PNG renders with Agg.
- A key missing on a step (eval is periodic) is a gap, not a zero: each series plots only the steps that
  have it, periodic ones with markers. The stacked time plot is the exception: a section missing on a
  step took no time there, so it stacks as 0.
- The time plot stacks every `time/*` key except `time/step`, which is drawn as a line on top. The loop
  may nest sections (one inside another); nested time is then stacked twice and shows above the line.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Row = dict[str, Any]
TIME_ORDER = ("time/rollout", "time/reward", "time/logprob", "time/train", "time/sync")


def column(rows: Sequence[Row], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that have a non-null `key`."""
    pairs = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
    steps = np.array([s for s, _ in pairs], dtype=np.int64)
    return steps, np.array([v for _, v in pairs], dtype=np.float64)


def has(rows: Sequence[Row], key: str) -> bool:
    return any(row.get(key) is not None for row in rows)


def mismatch_keys(rows: Sequence[Row]) -> list[str]:
    """Every logged key containing `mismatch`, sorted."""
    return sorted({k for row in rows for k, v in row.items() if "mismatch" in k and v is not None})


def time_keys(rows: Sequence[Row]) -> list[str]:
    """`time/*` sections (not `time/step`), the loop's phases first, in flow order, then `time/idle`."""
    logged = {k for row in rows for k, v in row.items() if k.startswith("time/") and v is not None}
    logged.discard("time/step")
    first = [k for k in TIME_ORDER if k in logged]
    rest = sorted(logged - set(first) - {"time/idle"})
    return first + rest + (["time/idle"] if "time/idle" in logged else [])


def _figure(num_panels: int, title: str) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 1.5 + 3.0 * num_panels), dpi=110, layout="constrained")
    axes = fig.subplots(num_panels, 1, sharex=True, squeeze=False)[:, 0].tolist()
    fig.suptitle(title, fontsize=14)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    return fig, axes


def _line(ax: Any, rows: Sequence[Row], key: str, label: str, **style: Any) -> None:
    steps, values = column(rows, key)
    if len(steps):
        periodic = len(steps) < 0.5 * len(rows)  # e.g. eval every N steps: markers make the points visible
        ax.plot(steps, values, label=label, marker="o" if periodic or len(steps) == 1 else None, **style)


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:  # a panel whose series were all absent gets no (warning) legend
        ax.legend(**{"loc": "best", **kwargs})


def plot_reward(rows: Sequence[Row]) -> Any:
    """Reward mean with a ±std band; pass rate and eval accuracy on a second panel when logged."""
    second = has(rows, "rollout/pass_rate") or has(rows, "eval/accuracy")
    if not has(rows, "rollout/reward_mean") and not second:
        return None
    fig, axes = _figure(2 if second else 1, "Reward")
    ax = axes[0]
    _line(ax, rows, "rollout/reward_mean", "reward mean", color="C0")
    both = [r for r in rows if r.get("rollout/reward_mean") is not None and r.get("rollout/reward_std") is not None]
    if both:
        steps, mean = column(both, "rollout/reward_mean")
        std = column(both, "rollout/reward_std")[1]
        ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2, label="± std")
    ax.set_title("Rollout reward")
    ax.set_ylabel("reward")
    _legend(ax)
    if second:
        ax = axes[1]
        _line(ax, rows, "rollout/pass_rate", "pass rate (rollout)", color="C2")
        _line(ax, rows, "eval/accuracy", "accuracy (eval)", color="C3")
        ax.set_title("Pass rate and held-out accuracy")
        ax.set_ylabel("fraction")
        _legend(ax)
    return fig


def plot_lengths(rows: Sequence[Row]) -> Any:
    """Response length mean and max; the truncated fraction on a second panel."""
    length_keys = [k for k in ("rollout/response_len_mean", "rollout/response_len_max") if has(rows, k)]
    truncated = has(rows, "rollout/truncated_frac")
    if not length_keys and not truncated:
        return None
    fig, axes = _figure(2 if length_keys and truncated else 1, "Response lengths")
    if length_keys:
        ax = axes[0]
        _line(ax, rows, "rollout/response_len_mean", "mean (rollout)", color="C0")
        _line(ax, rows, "rollout/response_len_max", "max (rollout)", color="C1", alpha=0.7)
        _line(ax, rows, "eval/response_len_mean", "mean (eval)", color="C3")
        ax.set_title("Response length")
        ax.set_ylabel("tokens")
        _legend(ax)
    if truncated:
        ax = axes[-1]
        _line(ax, rows, "rollout/truncated_frac", "truncated", color="C4")
        ax.set_title("Truncated responses (hit the length limit)")
        ax.set_ylabel("fraction")
        _legend(ax)
    return fig


def plot_time(rows: Sequence[Row]) -> Any:
    """Seconds per step stacked by section, with the measured step time as a line."""
    keys = time_keys(rows)
    if not keys and not has(rows, "time/step"):
        return None
    fig, (ax,) = _figure(1, "Time per step")
    if keys:
        timed = [r for r in rows if any(r.get(k) is not None for k in keys)]
        stack = np.array([[r.get(k) or 0.0 for r in timed] for k in keys])
        steps = np.array([r["step"] for r in timed])
        ax.stackplot(steps, stack, labels=[k.removeprefix("time/") for k in keys], alpha=0.85)
    _line(ax, rows, "time/step", "step (measured)", color="black", linewidth=1.2)
    ax.set_title("Wall time by section (stacked)")
    ax.set_ylabel("seconds")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_mismatch(rows: Sequence[Row]) -> Any:
    """One panel per mismatch metric (trainer vs rollout-engine logprobs); they differ in scale."""
    keys = mismatch_keys(rows)
    if not keys:
        return None
    fig, axes = _figure(len(keys), "Trainer vs rollout mismatch")
    for i, (ax, key) in enumerate(zip(axes, keys, strict=True)):
        _line(ax, rows, key, key, color=f"C{i % 10}")
        ax.set_title(key)
        ax.set_ylabel(key.rsplit("/", 1)[-1])
    return fig


def expert_load_keys(rows: Sequence[Row]) -> list[str]:
    """Per-layer expert-load keys (`.../load_max_over_mean/layer{i}`), in layer order."""
    keys = {k for row in rows for k in row if "load_max_over_mean/layer" in k}
    return sorted(keys, key=lambda k: int(k.rsplit("layer", 1)[-1]))


def plot_expert_load(rows: Sequence[Row]) -> Any:
    """Heat map of expert load imbalance (max over mean routed tokens) per MoE layer and step; 1 is uniform."""
    keys = expert_load_keys(rows)
    if not keys:
        return None
    steps = np.array([row["step"] for row in rows if keys[0] in row])
    grid = np.array([[row.get(k, np.nan) for row in rows if keys[0] in row] for k in keys], dtype=float)
    fig, (ax,) = _figure(1, "Expert load per MoE layer (max / mean routed tokens)")
    extent = (steps.min() - 0.5, steps.max() + 0.5, len(keys) - 0.5, -0.5)
    image = ax.imshow(grid, aspect="auto", cmap="magma", extent=extent, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="max / mean (1 = balanced)")
    ax.set_yticks(range(len(keys)))
    ax.grid(False)
    ax.set_xlabel("step")
    ax.set_ylabel("MoE layer")
    return fig


PLOTS: dict[str, Callable[[Sequence[Row]], Any]] = {
    "reward.png": plot_reward,
    "lengths.png": plot_lengths,
    "time.png": plot_time,
    "mismatch.png": plot_mismatch,
    "expert_load.png": plot_expert_load,
}
"""File name -> figure builder, in the order the report lists them."""
