"""`leagues sft`: supervised fine-tuning on prompt/response JSONL (see `leagues.train.sft`)."""

import os
import sys

from leagues.cli import UsageError
from leagues.cli.launch import distributed_session, launch_of, relaunch
from leagues.train.sft import SFTConfig, run_sft


def run_sft_verb(cfg: SFTConfig) -> int:
    launch = launch_of(cfg)
    if launch.needed:
        return relaunch(sys.argv[1:], launch)
    if not cfg.data:
        raise UsageError("data: give a JSONL file of prompt/response pairs (--data FILE)")
    rank = int(os.environ.get("RANK", 0))
    try:
        with distributed_session():
            losses = run_sft(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if losses and rank == 0:
        print(f"sft: {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}", file=sys.stderr)
    return 0
