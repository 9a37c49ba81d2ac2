"""`leagues train`: the RL job (see `leagues.loop`), on one process, `--nproc N` ranks of this node, or several
nodes (`--nnodes`, `--node_rank`, `--rdzv_endpoint`; see `launch.py`)."""

import sys

from leagues.cli import UsageError
from leagues.cli.launch import distributed_session, launch_of, relaunch
from leagues.loop import TrainConfig, train
from leagues.rollout import RewardError


def run_train_verb(cfg: TrainConfig) -> int:
    launch = launch_of(cfg)
    if launch.needed:
        return relaunch(sys.argv[1:], launch)
    try:
        with distributed_session():
            train(cfg)
    except (ValueError, RewardError) as e:  # bad input, or a reward that fails on every sample
        raise UsageError(str(e)) from None
    return 0
