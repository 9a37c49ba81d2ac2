"""Colocated weight sync against a device copy of the same bytes, on one GPU.

The trainer runs as `leagues train` runs it on one GPU (a process group of one rank: float32 masters, bf16
compute copies cast once per optimizer step, no FSDP); the engine sits in the same process. Two transports are
timed: `whole` (the run's default: one bucket of the trainer's bf16 compute copies, landed by `_foreach_copy_`)
and `masters` (the float32 masters in 512 MB buckets, cast by the engine as it copies: what a trainer without
copies would send). After each, the engine's weights are compared bit for bit with the other transport's.

One row per (shape, transport) to $OUT/sync.jsonl: `shape`, `transport`, `gb` (bytes landed in the engine),
`sync_ms` (median), `gb_per_s`, `copy_gb_per_s` (a plain device copy of `gb` bytes, read and write counted
as the copy's bytes), `frac_of_copy` (copy time / sync time), `moved_gb` (bytes read and written by the
copies into the engine: the trainer's tensors read, the engine's dtype written), `moved_frac_of_copy` (moved
bytes a second over the copy's), `bitwise_equal`. A float32-to-bf16 sync reads twice what it lands, so
`frac_of_copy` is at most 2/3 for `masters`, while a bf16 `whole` sync can reach 1.

    PYTHONPATH=. python benchmarks/sync.py [--shapes anchor,wide] [--repeats 10] [--profile]

`--profile`: one profiled `whole` sync a shape, its top ops by GPU time to $OUT/profile-sync-<shape>.txt.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.cli.launch import init_distributed, shutdown_distributed
from leagues.engine import Engine
from leagues.sync import push_in_place
from leagues.train import Trainer, TrainerConfig


def timed_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_time_ms(nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return timed_ms(lambda: dst.copy_(src), repeats)


def profile_once(name: str, push) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        push()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), f"profile-sync-{name}.txt"), "w") as f:
        f.write(table)


def bench_shape(name: str, repeats: int, out: str, profiled: bool = False) -> None:
    path = tempfile.mkdtemp(prefix=f"bench-sync-{name}-")
    make_checkpoint(BASE | SHAPES[name], path)
    trainer = Trainer(path, TrainerConfig(compile=False))
    engine = Engine(path, num_blocks=64, cuda_graphs=False, compile_model="false")
    try:
        dtype = engine.model.embed.weight.dtype
        numel = sum(p.numel() for p in engine.model.parameters())
        nbytes = numel * engine.model.embed.weight.element_size()
        copy_ms = copy_time_ms(nbytes, repeats)
        transports = {
            "whole": lambda: push_in_place(trainer.state_dict_for_sync(dtype=dtype), engine, version=1),
            "masters": lambda: push_in_place(trainer.state_dict_for_sync(), engine, version=1),
        }
        if profiled:
            profile_once(name, transports["whole"])
        first = next(iter(trainer.state_dict_for_sync(dtype=dtype)))[0][1]
        read_size = {"whole": first.element_size(), "masters": next(trainer.model.parameters()).element_size()}
        landed = {}
        for transport, push in transports.items():
            ms = timed_ms(push, repeats)
            landed[transport] = [p.detach().clone() for p in engine.model.parameters()]
            row = dict(
                shape=name,
                transport=transport,
                gb=round(nbytes / 1e9, 3),
                sync_ms=round(ms, 2),
                gb_per_s=round(nbytes / 1e6 / ms, 1),
                copy_gb_per_s=round(2 * nbytes / 1e6 / copy_ms, 1),
                frac_of_copy=round(copy_ms / ms, 3),
                moved_gb=round(numel * (read_size[transport] + engine.model.embed.weight.element_size()) / 1e9, 3),
                card=torch.cuda.get_device_name(),
            )
            row["moved_frac_of_copy"] = round(row["moved_gb"] / ms * 1e3 / row["copy_gb_per_s"], 3)
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
        equal = all(torch.equal(a, b) for a, b in zip(landed["whole"], landed["masters"], strict=True))
        print(json.dumps({"shape": name, "bitwise_equal": equal}), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps({"shape": name, "bitwise_equal": equal}) + "\n")
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="anchor,wide")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    init_distributed()
    out = os.path.join(os.environ.get("OUT", "/tmp"), "sync.jsonl")
    for name in args.shapes.split(","):
        bench_shape(name, args.repeats, out, args.profile)
        torch.cuda.empty_cache()
    shutdown_distributed()


if __name__ == "__main__":
    main()
