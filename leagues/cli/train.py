"""`leagues train`: the RL job (see `leagues.loop`), on one process or `--nproc N` ranks of this node."""

import sys

from leagues.cli import UsageError
from leagues.cli.launch import init_distributed, relaunch, shutdown_distributed, under_launcher
from leagues.loop import TrainConfig, train


def run_train_verb(cfg: TrainConfig) -> int:
    if cfg.nproc > 1 and not under_launcher():
        return relaunch(sys.argv[1:], cfg.nproc)
    init_distributed()
    try:
        train(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        shutdown_distributed()
    return 0
