"""Multi-process launch for `leagues train|sft --nproc N`: the same command under torchrun's launcher.

One SPMD program: with `--nproc N` on a single node the command re-runs itself through
`torch.distributed.run --standalone` (nothing home-made: multi-node is plain `torchrun`). Under a
launcher (RANK set), `init_distributed` joins the group: NCCL on GPUs, gloo on CPUs.
"""

import contextlib
import gc
import os
import subprocess
import sys

import torch
import torch.distributed as dist


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `leagues <argv>` with `nproc` ranks on this node; returns the launcher's exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*cmd, "-m", "leagues.cli", *strip_option(argv, "--nproc")])


def strip_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (the ranks must not relaunch themselves)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out


def init_distributed() -> None:
    """Join the launcher's group; on a GPU without a launcher, make a group of one rank, so the trainer
    still gets FSDP2's bf16 compute with float32 master weights (on the CPU one process needs no group)."""
    if dist.is_initialized():
        return
    if under_launcher():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    elif torch.cuda.is_available():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)


@contextlib.contextmanager
def distributed_session():
    """The group around a rank's work: joined on entry, left cleanly when the work returns.

    When the work raises, this rank leaves at once, without the closing barrier: its peers may be inside
    a collective it will never join, and its exit is what lets the launcher stop them (a barrier here
    would pair with their collective and hang the job)."""
    init_distributed()
    yield
    shutdown_distributed()


def shutdown_distributed() -> None:
    """Leave the group. FSDP2 modules sit in reference cycles that still hold the gradient
    reduce-scatter's gloo work; freed only at interpreter exit, after the group, they abort the
    process under load ("terminate called without an active exception"), so collect them first."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
