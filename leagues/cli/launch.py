"""Multi-process launch for `leagues train|sft --nproc N [--nnodes M --node_rank R --rdzv_endpoint HOST:PORT]`:
the same command under torchrun's launcher.

One SPMD program: with `--nproc N` on a single node the command re-runs itself through
`torch.distributed.run --standalone`. On several nodes, the same command runs on every node with that node's
`--node_rank` and the same `--rdzv_endpoint` (node 0's address and a free port), and is handed to torchrun's
static rendezvous as `--nnodes M --node-rank R --rdzv-endpoint HOST:PORT` (nothing home-made: it is plain
`torchrun`, and ranks are numbered node by node). Under a launcher (RANK set), `init_distributed` joins the
group: NCCL on GPUs, gloo on CPUs.
"""

import contextlib
import gc
import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@dataclass(frozen=True, slots=True)
class Launch:
    """Where this command's ranks run: `nproc` on this node, node `node_rank` of `nnodes`."""

    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""

    def __post_init__(self) -> None:
        from leagues.cli import UsageError

        if self.nproc < 1 or self.nnodes < 1:
            raise UsageError(f"nproc and nnodes: must be >= 1, got {self.nproc} and {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"node_rank: must be in 0..{self.nnodes - 1} (nnodes {self.nnodes}), got {self.node_rank}")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit()):
            raise UsageError(
                f"rdzv_endpoint: nnodes {self.nnodes} needs HOST:PORT of node 0 (the same on every node), "
                f"got {self.rdzv_endpoint!r}"
            )

    @property
    def needed(self) -> bool:
        """Whether this command must re-run itself under torchrun (more than one rank, not launched yet)."""
        return (self.nproc > 1 or self.nnodes > 1) and not under_launcher()

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc}"]
        return [
            f"--nnodes={self.nnodes}",
            f"--node-rank={self.node_rank}",
            f"--rdzv-endpoint={self.rdzv_endpoint}",
            f"--nproc-per-node={self.nproc}",
        ]


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node_rank", "--rdzv_endpoint")


def launch_of(cfg) -> Launch:
    """The launch settings of a verb's config (`TrainConfig`, `SFTConfig`)."""
    return Launch(nproc=cfg.nproc, nnodes=cfg.nnodes, node_rank=cfg.node_rank, rdzv_endpoint=cfg.rdzv_endpoint)


def relaunch(argv: list[str], launch: Launch | int) -> int:
    """Run `leagues <argv>` under torchrun as `launch` says (an int: that many ranks on this node); returns the
    launcher's exit status."""
    launch = Launch(nproc=launch) if isinstance(launch, int) else launch
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch.torchrun_args()]
    for option in LAUNCH_OPTIONS:  # the ranks must not relaunch themselves; options may be spelt with - or _
        argv = strip_option(strip_option(argv, option), option.replace("_", "-"))
    return subprocess.call([*cmd, "-m", "leagues.cli", *argv])


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
