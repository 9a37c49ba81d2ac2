"""Where an engine decode step spends its time: host phases (synchronised timers) and top GPU kernels.

PYTHONPATH=. python benchmarks/profile_engine.py [--batch 1,64] [--eager] [--compile-model auto|true|false]
    [--deterministic] [--cprofile]

`--eager` runs without CUDA graphs, so the profile lists the step's kernels one by one (and counts them);
with `--compile-model true` they are the compiled step's kernels.
"""

import argparse
import cProfile
import pstats
import tempfile
import time
from collections import defaultdict
from concurrent.futures import Future

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.engine import prompts
from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.engine import Engine, SamplingParams
from leagues.engine.requests import Add


def timed_steps(engine: Engine, num_steps: int) -> dict[str, float]:
    """Run `num_steps` steps in this thread as the engine does (`step_unsynced`; `land_wait_unsynced` of it blocked
    on the step in flight, `host_unsynced` the rest: the host's own work), then `num_steps` more timing each phase
    with a device sync around it (which undoes overlap scheduling)."""
    totals = defaultdict(float)
    original = {name: getattr(engine.runner, name) for name in ("prepare", "execute", "launch", "land")}

    def waits(*args, **kwargs):  # unsynced: the host's time blocked on the step in flight
        start = time.perf_counter()
        out = original["land"](*args, **kwargs)
        totals["land_wait_unsynced"] += time.perf_counter() - start
        return out

    def wrap(name, fn):
        def inner(*args, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            totals[name] += time.perf_counter() - start
            return out

        return inner

    engine.runner.land = waits
    totals["step_unsynced"] = _run_steps(engine, num_steps)
    engine.runner.land = original["land"]
    totals["host_unsynced"] = totals["step_unsynced"] - totals["land_wait_unsynced"]
    for name, fn in original.items():
        setattr(engine.runner, name, wrap(name, fn))
    totals["step_total"] = _run_steps(engine, num_steps)
    for name, fn in original.items():
        setattr(engine.runner, name, fn)
    return {k: round(v / num_steps * 1e3, 3) for k, v in totals.items()}


def _run_steps(engine: Engine, num_steps: int) -> float:
    """Seconds `num_steps` engine steps take, from an idle device to an idle device."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="1,64,256")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs, so kernels show one by one")
    parser.add_argument("--sort", default="self_cuda_time_total", help="the table's order (the kernels' GPU time)")
    parser.add_argument("--compile-model", default="auto")
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--deterministic", action="store_true", help="the engine's deterministic mode")
    parser.add_argument("--cprofile", action="store_true", help="also a cProfile top list of unsynced steps (host)")
    args = parser.parse_args()
    hf = BASE | SHAPES[args.shape]
    path = tempfile.mkdtemp()
    make_checkpoint(hf, path)
    options = dict(cuda_graphs=not args.eager, compile_model=args.compile_model, deterministic=args.deterministic)
    engine = Engine(path, max_model_len=1024, kv_cache_fraction=0.5, **options)
    engine.close()  # drive steps from this thread
    params = SamplingParams(temperature=1.0, max_new_tokens=400, ignore_eos=True, seed=0)
    for batch in (int(b) for b in args.batch.split(",")):
        # random prompts as benchmarks/engine.py has them: identical ones would route alike and touch few experts
        for i, prompt in enumerate(prompts(batch, 64, hf["vocab_size"], seed=batch)):
            engine.table.add(Add(f"b{batch}-{i}", prompt, params, Future()), engine.weight_version)
        for _ in range(5):
            engine.step()  # prefill and warm-up
        print(f"batch {batch} ms/step by phase:", timed_steps(engine, 50))
        if args.cprofile:  # where the host's unsynced time goes; a call blocked on the device shows as its tottime
            profiler = cProfile.Profile()
            profiler.runcall(_run_steps, engine, 50)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(e.count for e in on_gpu) / 20
        busy_ms = sum(e.self_device_time_total for e in on_gpu) / 20 / 1e3
        print(f"batch {batch}: {kernels:.0f} GPU kernels and copies a step, {busy_ms:.3f} ms of GPU time a step")
        print(events.table(sort_by=args.sort, row_limit=30, max_name_column_width=60))
        if engine.stepper.inflight is not None:
            engine.stepper.land()
        for rid in list(engine.requests):
            engine.table.abort(rid)


if __name__ == "__main__":
    main()
