"""`leagues train` on a rank whose engine fails its third step (run under torchrun by the loop tests).

The fault is raised where a real one would be (a kernel error, out of memory), before the step's first
expert exchange, so with expert-parallel engines the other rank is left waiting inside that exchange.
"""

import sys

import torch.distributed as dist

from leagues.cli.launch import distributed_session
from leagues.config import apply_overrides
from leagues.engine.runner import ModelRunner
from leagues.loop import TrainConfig, train

FAILING_RANK = 1
calls = 0
execute = ModelRunner.execute


def failing_execute(self, batch, *args):
    global calls
    calls += 1
    if dist.get_rank() == FAILING_RANK and calls == 3:
        raise RuntimeError(f"fault in rank {FAILING_RANK}'s engine step")
    return execute(self, batch, *args)


ModelRunner.execute = failing_execute
with distributed_session():
    train(apply_overrides(TrainConfig(), sys.argv[1:]))
