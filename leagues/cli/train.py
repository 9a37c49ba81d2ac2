"""`leagues train`: the RL job (see `leagues.loop`), on one process or `--nproc N` ranks of this node."""

import sys

from leagues.cli import UsageError
from leagues.cli.launch import distributed_session, relaunch, under_launcher
from leagues.loop import TrainConfig, train
from leagues.rollout import RewardError


def run_train_verb(cfg: TrainConfig) -> int:
    if cfg.nproc > 1 and not under_launcher():
        return relaunch(sys.argv[1:], cfg.nproc)
    try:
        with distributed_session():
            train(cfg)
    except (ValueError, RewardError) as e:  # bad input, or a reward that fails on every sample
        raise UsageError(str(e)) from None
    return 0
