"""Test ranks in child processes forked from a server process that imported torch and leagues once.

A spawned child starts a fresh interpreter and imports torch and leagues again, about 5 s of CPU a process on
the 2-core test machine; the distributed tests start two such children each, dozens of times a run. A
forkserver imports them once per test worker (`PRELOAD`) and forks each child from that clean process (no
threads, no CUDA context, no event loop of the parent's), so a child starts in milliseconds and still begins
clean, as a spawned one would.
"""

import multiprocessing

import torch.multiprocessing as mp

PRELOAD = ["torch", "torch.distributed", "leagues.model", "leagues.parallel", "leagues.train", "leagues.engine"]


def context() -> multiprocessing.context.BaseContext:
    """The forkserver context (`Process`, `Queue`, ... of children forked from the preloaded server)."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # read when the server starts: its first use in this process
    return mp.get_context("forkserver")


def start_ranks(fn, args: tuple, nprocs: int) -> None:
    """`fn(rank, *args)` on `nprocs` forked children, waited for; a child's exception is raised here, as
    `torch.multiprocessing.spawn` raises it."""
    context()
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")
