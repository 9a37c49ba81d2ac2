"""`leagues train`: the RL job (see `leagues.loop`), on one process, `--nproc N` ranks of this node, or several
nodes (`--nnodes`, `--node_rank`, `--rdzv_endpoint`; see `launch.py`).

With `--auto_resume N` this process only supervises: it runs the same command as a child with a fixed run
directory, and when the child fails (any exit status but 0 and 2, a signal included) it runs it again with
`--checkpoint.resume true`, at most N times. Resume is exact (data position, RNG states, optimizer), so the
metrics equal an uninterrupted run's. Bad input (exit status 2) is not retried: it would fail the same way.

External engines' key: `--fleet.api_key`, else `$LEAGUES_API_KEY` (which keeps it out of the process list); it is
never written to the run's `config.yaml`.
"""

import os
import subprocess
import sys

from leagues.cli import UsageError
from leagues.cli.launch import distributed_session, launch_of, relaunch, under_launcher
from leagues.loop import TrainConfig, train
from leagues.loop.disaggregated import num_trainer_ranks
from leagues.loop.run import resolve_run_dir
from leagues.rollout import RewardError

USAGE_EXIT = 2


def run_train_verb(cfg: TrainConfig) -> int:
    cfg.fleet.api_key = cfg.fleet.api_key or os.environ.get("LEAGUES_API_KEY", "")
    if cfg.auto_resume < 0:
        raise UsageError(f"auto_resume: must be >= 0, got {cfg.auto_resume}")
    if cfg.auto_resume and not under_launcher():
        return supervise(sys.argv[1:], cfg.auto_resume, str(resolve_run_dir(cfg)))
    launch = launch_of(cfg)
    if launch.needed:
        if cfg.placement == "disaggregated":  # a split that cannot run is said once, before any rank starts
            try:
                num_trainer_ranks(cfg, launch.nproc * launch.nnodes)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return relaunch(sys.argv[1:], launch)
    try:
        with distributed_session():
            train(cfg)
    except (ValueError, RewardError) as e:  # bad input, or a reward that fails on every sample
        raise UsageError(str(e)) from None
    return 0


def supervise(argv: list[str], restarts: int, run_dir: str) -> int:
    """Run `leagues <argv>` in `run_dir` until it succeeds, resuming after each failure, `restarts` times at most;
    returns the last attempt's exit status."""
    cmd = [sys.executable, "-m", "leagues.cli", *argv, "--auto_resume", "0", "--run_dir", run_dir]
    code = subprocess.call(cmd)
    for attempt in range(1, restarts + 1):
        if code in (0, USAGE_EXIT):
            return code
        print(
            f"auto_resume: the job failed ({_describe(code)}); resuming from its last checkpoint "
            f"(restart {attempt} of {restarts})",
            file=sys.stderr,
            flush=True,
        )
        code = subprocess.call([*cmd, "--checkpoint.resume", "true"])
    if code not in (0, USAGE_EXIT):
        print(f"auto_resume: the job failed ({_describe(code)}) and has no restarts left", file=sys.stderr)
    return code if code >= 0 else 128 - code  # a signal as the shell reports it


def _describe(code: int) -> str:
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"
