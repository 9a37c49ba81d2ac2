"""Training: RL losses and advantage estimators (registries), chunked logprobs, packing, optimizer,
checkpoints, the `Trainer` (with PPO's critic, or a distillation teacher, when asked), and SFT. Runs the same
`leagues.model` the engine
serves, sharded from outside by `leagues.parallel` (FSDP2 + expert parallel).
"""

from leagues.train.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, AdvantageInputs, compute_advantages
from leagues.train.critic import CriticConfig
from leagues.train.distill import DistillConfig
from leagues.train.losses import AGGREGATIONS, KL_ESTIMATORS, OFF_POLICY_CORRECTIONS, POLICY_LOSSES, LossConfig
from leagues.train.optim import OptimConfig
from leagues.train.trainer import Trainer, TrainerConfig

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "OFF_POLICY_CORRECTIONS",
    "POLICY_LOSSES",
    "AdvantageConfig",
    "AdvantageInputs",
    "CriticConfig",
    "DistillConfig",
    "LossConfig",
    "OptimConfig",
    "Trainer",
    "TrainerConfig",
    "compute_advantages",
]
