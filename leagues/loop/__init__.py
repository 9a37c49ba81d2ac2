"""The RL loop: `train(TrainConfig)` runs a whole job (warm start, rollout, rewards, training, weight sync,
evaluation, metrics, checkpoints), colocated (`train.py`, which reads top to bottom) or disaggregated
(`disaggregated.py`).
"""

from leagues.loop.config import CheckpointConfig, EvalConfig, TrainConfig, WarmStartConfig, WeightSyncConfig, resolve
from leagues.loop.disaggregated import train_disaggregated
from leagues.loop.train import train_colocated


def train(cfg: TrainConfig) -> list[dict[str, float]]:
    """Run the job in its placement, as `resolve(cfg)` settles it; returns the per-step metrics (rank 0 of a
    disaggregated job has them all)."""
    cfg = resolve(cfg)
    if cfg.placement == "disaggregated":
        return train_disaggregated(cfg)
    return train_colocated(cfg)


__all__ = [
    "CheckpointConfig",
    "EvalConfig",
    "TrainConfig",
    "WarmStartConfig",
    "WeightSyncConfig",
    "resolve",
    "train",
    "train_colocated",
    "train_disaggregated",
]
