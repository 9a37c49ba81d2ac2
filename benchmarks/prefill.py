"""Time to first token of the engine alone: prefill latency of small batches of short prompts.

One GPU, bf16, the ANCHORS.md shape with random weights. For each (batch, prompt length): the first call (which
pays any compile of a new token count) and the median of the next ones, of `Engine.generate` with one new token,
plus the engine's own time to first token (`first_token_time - arrival_time` of the outputs). An HTTP server's
arrivals come one or a few at a time, so this is the step that every request waits for, and that a request
arriving meanwhile waits behind. `--profile` writes, for one batch-1 prefill of 64 tokens: the profiler's
table (`prefill-profile-*.txt`), the Python profile of the engine thread's steps (`prefill-cprofile-*.txt`), and
every host-device synchronisation with the Python stack that caused it (`prefill-syncs-*.txt`).

    PYTHONPATH=. python benchmarks/prefill.py [--shape anchor] [--batches 1,2,8,64] [--lens 64,61,100] [--eager]

Rows to $OUT/prefill.jsonl: `shape`, `batch`, `prompt_tokens`, `compiled`, `first_ms`, `median_ms`,
`engine_ttft_ms` (medians of fresh prompts), `cached_median_ms` (the same prompts again: cached prefixes).
"""

import argparse
import collections
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

from benchmarks.engine import log, prompts
from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.engine import Engine, SamplingParams

OUT = os.environ.get("OUT", "/tmp")


def _once(engine: Engine, batch: list[list[int]]) -> tuple[float, float]:
    params = SamplingParams(temperature=1.0, max_new_tokens=1, ignore_eos=True, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = engine.generate(batch, params)
    wall = time.perf_counter() - start
    return wall, statistics.median(o.first_token_time - o.arrival_time for o in outs)


def _rows(engine: Engine, args, hf: dict, compiled: bool) -> None:
    """Fresh prompts each call (no cached prefix), then one batch repeated (its prefix cached but for the last
    block): a server sees the first, the n samples of an RL prompt the second."""
    for length in (int(n) for n in args.lens.split(",")):
        for batch_size in (int(b) for b in args.batches.split(",")):
            seed = batch_size * 1000 + length
            fresh = [
                _once(engine, prompts(batch_size, length, hf["vocab_size"], seed=seed + i))
                for i in range(1 + args.reps)
            ]
            batch = prompts(batch_size, length, hf["vocab_size"], seed=seed)
            cached = [_once(engine, batch) for _ in range(args.reps)]
            log(
                args.out,
                what="prefill_latency",
                shape=args.shape,
                batch=batch_size,
                prompt_tokens=length,
                compiled=compiled,
                switch_interval_s=sys.getswitchinterval(),
                first_ms=round(fresh[0][0] * 1e3, 2),
                median_ms=round(statistics.median(r[0] for r in fresh[1:]) * 1e3, 2),
                engine_ttft_ms=round(statistics.median(r[1] for r in fresh[1:]) * 1e3, 2),
                cached_median_ms=round(statistics.median(r[0] for r in cached) * 1e3, 2),
            )


def _loop(engine: Engine, hf: dict, seconds: float) -> None:
    """Fresh batch-1 prefills of 64 tokens for `seconds` (for a sampling profiler attached from outside, once
    $OUT/prefill-ready exists)."""
    open(os.path.join(OUT, "prefill-ready"), "w").close()
    end, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < end:
        count += 1
        _once(engine, prompts(1, 64, hf["vocab_size"], seed=10**6 + count))
    log(os.path.join(OUT, "prefill-loop.jsonl"), what="prefill_loop", prefills=count, seconds=seconds)


def _profile(engine: Engine, hf: dict, tag: str) -> None:
    batch = prompts(1, 64, hf["vocab_size"], seed=7)
    _once(engine, batch)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        wall, _ = _once(engine, batch)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
    cuda = [e for e in averages if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels, busy_us = sum(e.count for e in cuda), sum(e.self_device_time_total for e in cuda)
    with open(os.path.join(OUT, f"prefill-profile-{tag}.txt"), "w") as f:
        f.write(f"one batch-1 prefill of 64 tokens: wall {wall * 1e3:.2f} ms (profiled), {kernels} CUDA kernels, ")
        f.write(f"{busy_us / 1e3:.2f} ms of GPU time\n\n{table}\n")
        f.write(averages.table(sort_by="self_device_time_total", row_limit=25))
    _python_profile(engine, batch, tag)
    _sync_stacks(engine, batch, tag)


def _python_profile(engine: Engine, batch: list[list[int]], tag: str) -> None:
    """cProfile of the engine thread's steps (the work runs there, not on the caller's thread)."""
    profiler, step = cProfile.Profile(), engine.stepper.step

    def profiled_step():
        profiler.enable()
        try:
            return step()
        finally:
            profiler.disable()

    engine.stepper.step = profiled_step
    try:
        for _ in range(5):
            _once(engine, batch)
    finally:
        engine.stepper.step = step
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(40)
    with open(os.path.join(OUT, f"prefill-cprofile-{tag}.txt"), "w") as f:
        f.write(f"5 batch-1 prefills of 64 tokens, engine thread only\n{text.getvalue()}")


def _sync_stacks(engine: Engine, batch: list[list[int]], tag: str) -> None:
    """Each distinct Python stack that made the host wait for the device in one prefill, with its count."""
    stacks: collections.Counter = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "warnings" not in f.filename]
        stacks["".join(traceback.format_list(frames[-8:])) + f"  -> {message}\n"] += 1

    previous = warnings.showwarning
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            _once(engine, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    with open(os.path.join(OUT, f"prefill-syncs-{tag}.txt"), "w") as f:
        f.write(f"{sum(stacks.values())} synchronising calls in one batch-1 prefill of 64 tokens\n\n")
        for stack, count in stacks.most_common():
            f.write(f"--- {count}x\n{stack}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--batches", default="1,2,8,64")
    parser.add_argument("--lens", default="64,61,100")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--eager", action="store_true", help="also an engine with compile_model=False")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--loop", type=float, default=0.0, help="then prefill in a loop this many seconds")
    parser.add_argument("--switch-interval", type=float, default=None, help="sys.setswitchinterval for the run")
    parser.add_argument("--out", default=os.path.join(OUT, "prefill.jsonl"))
    args = parser.parse_args()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    hf = BASE | SHAPES[args.shape]
    path = tempfile.mkdtemp()
    make_checkpoint(hf, path)
    for compiled in (True, False) if args.eager else (True,):
        engine = Engine(path, max_model_len=2048, kv_cache_fraction=0.15, compile_model="auto" if compiled else "false")
        _once(engine, prompts(8, 64, hf["vocab_size"], seed=1))
        _rows(engine, args, hf, engine.runner.compiled)
        if args.profile:
            _profile(engine, hf, "compiled" if compiled else "eager")
        if args.loop:
            _loop(engine, hf, args.loop)
        engine.close()
        del engine
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
