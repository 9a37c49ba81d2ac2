"""How a training step's metrics combine: over micro-batches, over ranks, over the updates of a rollout batch.

The losses return each metric as a mean over a micro-batch's loss tokens (or a maximum, for keys ending in
`_max`). The trainer adds them up weighted by those tokens (`accumulate`), reduces the sums over ranks into
means over the global batch (`reduce_over_ranks`), and averages the updates of one rollout batch
(`merge_updates`), so a metric does not depend on how the batch was split into micro-batches, ranks or
mini-batches.

Decisions:
- `_tokens` carries the token count from micro-batch to rank reduction; `loss` is a sum, not a mean: each
  micro-batch's loss is already its share of the global loss.
- Ranks may lack a metric another rank has (a padding pass computes no MoE metrics, say): before reducing,
  every rank agrees on the keys, a missing one counting 0 (or -inf for a maximum).
"""

import torch
import torch.distributed as dist


def accumulate(totals: dict[str, float], metrics: dict, weight: float) -> None:
    """Add one micro-batch's metrics (token means, or maxima for `*_max`) over `weight` loss tokens."""
    for key, value in metrics.items():
        if key.endswith("_max"):  # maxima combine by max (across micro-batches here, ranks below)
            totals[key] = max(totals.get(key, float("-inf")), float(value))
        else:
            totals[key] = totals.get(key, 0.0) + float(value) * weight
    totals["_tokens"] = totals.get("_tokens", 0.0) + weight


def reduce_over_ranks(totals: dict[str, float], world: int, device: torch.device, group=None) -> dict[str, float]:
    """Token-weighted means over the global batch (the `world` ranks of `group`; None: every rank of the job);
    `*_max` keys are maxima; loss and tokens are sums."""
    if world > 1:  # every rank reduces the same keys, even one whose passes lacked some metric
        names: list[list[str]] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(names, sorted(totals), group=group)
        for key in set().union(*names) - totals.keys():
            totals[key] = float("-inf") if key.endswith("_max") else 0.0
    maxima = {k: v for k, v in totals.items() if k.endswith("_max")}
    sums = {k: v for k, v in totals.items() if k not in maxima}
    reduced = {}
    for values, op in ((sums, dist.ReduceOp.SUM), (maxima, dist.ReduceOp.MAX)):
        keys = sorted(values)
        tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
        if world > 1 and keys:
            dist.all_reduce(tensor, op=op, group=group)
        reduced.update(zip(keys, tensor.tolist(), strict=True))
    tokens = reduced.pop("_tokens", 0.0)  # 0: a step with nothing to learn from (every sample failed)
    loss = reduced.pop("loss", 0.0)
    out = {k: (v if k in maxima else v / max(tokens, 1.0)) for k, v in reduced.items()}
    return out | {"loss": loss, "tokens": tokens}


def merge_updates(updates: list[dict[str, float]], epochs: int) -> dict[str, float]:
    """One rollout batch's metrics from its updates: means (maxima for `*_max`); `tokens` counts the batch once."""
    merged = {}
    for key in dict.fromkeys(k for u in updates for k in u):
        values = [u[key] for u in updates if key in u]
        merged[key] = max(values) if key.endswith("_max") else sum(values) / len(values)
    merged["tokens"] = sum(u["tokens"] for u in updates) / epochs
    return merged
