"""The RL loop: `train(TrainConfig)` runs a whole job (warm start, rollout, rewards, training, weight sync,
evaluation, metrics, checkpoints), colocated or disaggregated. `train.py` reads top to bottom.
"""

from leagues.loop.config import EvalConfig, TrainConfig, WarmStartConfig
from leagues.loop.train import train

__all__ = ["EvalConfig", "TrainConfig", "WarmStartConfig", "train"]
