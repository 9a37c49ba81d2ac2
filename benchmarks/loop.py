"""The main job on GPUs: `leagues.loop.train`, colocated, on a ~1B Qwen3-MoE shape, 1..N ranks.

The model is the `anchor` shape of `train_step.py` (24 layers, hidden 1024, 64 experts of FFN 256, top-8)
with the tiny character vocabulary (so the built-in arithmetic task and its tokenizer apply): 1.2B
parameters. A short SFT warm start gives the reward a signal; then GRPO steps on the arithmetic task.
Reported from the run's own metrics, over the steps after the first two (the run writes no
checkpoints): step time and its breakdown, rollout and train tokens/s, weight-sync GB/s against a
device-to-device copy measured in the same run, and the reward at the first and last step. One JSON row
goes to $OUT/loop.jsonl (rank 0).

    PYTHONPATH=. torchrun --standalone --nproc-per-node N benchmarks/loop.py [--steps 12] [--warm-start 60]
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.cli.launch import init_distributed, shutdown_distributed
from leagues.config import from_dict
from leagues.loop import TrainConfig, train
from leagues.model.tokenizer import TINY_VOCAB_SIZE, write_tiny_tokenizer


def copy_gb_per_s() -> float:
    """Device-to-device copy of 1 GiB: bytes read and written per second (the in-place sync's ceiling)."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.nbytes * 10 / (time.perf_counter() - start) / 1e9


def write_row(row: dict, filename: str) -> None:
    """Print one result row and append it to $OUT/filename (/tmp without $OUT)."""
    print(json.dumps(row), flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), filename), "a") as f:
        f.write(json.dumps(row) + "\n")


def summarize(history: list[dict], args, world: int) -> dict:
    rows = history[2:] or history  # not the warm-up steps
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in rows)  # noqa: E731
    has = lambda key: all(key in r for r in rows)  # noqa: E731
    step = mean("time/step")
    sections = ("rollout", "reward", "train", "sync", "sleep", "eval", "save", "idle")
    return {
        "gpus": world,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "steps_timed": len(rows),
        "step_s": round(step, 3),
        "rollout_s": round(mean("time/rollout"), 3),
        "train_s": round(mean("time/train"), 3),
        "share": {s: round(mean(f"time/{s}") / step, 3) for s in sections},
        "rollout_tokens_per_s": round(mean("rollout/tokens_per_s")),
        "train_tokens_per_s": round(mean("train/tokens_per_s")),
        "sync_s": round(mean("time/sync"), 3),
        "sync_gb": round(mean("sync/gb"), 2),
        "sync_gb_per_s": round(mean("sync/gb_per_s"), 1),
        "mismatch_abs_mean": mean("train/mismatch/abs_diff_mean"),
        "mismatch_abs_max": max(r.get("train/mismatch/abs_diff_max", 0.0) for r in rows),
        "mismatch_kl_k3": mean("train/mismatch/kl_k3"),
        "route_mismatch_frac": mean("train/moe/route_mismatch_frac") if has("train/moe/route_mismatch_frac") else None,
        "reward_first": round(history[0]["rollout/reward_mean"], 3),
        "reward_last": round(history[-1]["rollout/reward_mean"], 3),
        "rewards": [round(r["rollout/reward_mean"], 3) for r in history],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warm-start", type=int, default=60)
    parser.add_argument("--shape", default="anchor", help="a shape of train_step.py (smoke: a CPU check)")
    parser.add_argument("--path", default=None)
    parser.add_argument("--engine-sleep", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--routing-replay", default="none", choices=["none", "rollout"])
    parser.add_argument("--deterministic", action="store_true", help="batch-invariant kernels on both sides")
    parser.add_argument("--engine-graphs", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--warm-lr", type=float, default=3e-4)
    parser.add_argument("--kv-cache-fraction", type=float, default=0.8, help="of free memory, for the engine")
    parser.add_argument("--max-response-len", type=int, default=8)
    parser.add_argument("--run-dir", default=None, help="keep the run here (its warm_start/ can seed later runs)")
    args = parser.parse_args()
    args.path = args.path or f"/tmp/leagues-bench-loop-{args.shape}"
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0 and not os.path.isfile(os.path.join(args.path, "config.json")):
        hf = BASE | SHAPES[args.shape] | {"vocab_size": TINY_VOCAB_SIZE, "eos_token_id": 2, "pad_token_id": 0}
        params = make_checkpoint(hf, args.path)
        write_tiny_tokenizer(args.path)
        print(f"model: {params / 1e9:.2f}B parameters", flush=True)
    dist.barrier()
    overrides = {
        "model": args.path,
        "task": "arithmetic",
        "warm_start": {"steps": args.warm_start, "batch_size": 64, "lr": args.warm_lr},
        "steps": args.steps,
        # routes recorded in every run, so the default run measures how often the trainer routes differently
        "rollout": {
            "batch_size": 64,
            "n_samples_per_prompt": 8,
            "max_response_len": args.max_response_len,
            "return_routes": True,
        },
        "trainer": {
            "optim": {"lr": 1e-5},
            "loss": {"eps_clip_high": 0.28, "off_policy": "token_tis"},
        },
        "engine_sleep": args.engine_sleep,
        "deterministic": args.deterministic,
        "engine": {"cuda_graphs": args.engine_graphs, "kv_cache_fraction": args.kv_cache_fraction},
        "checkpoint": {"enabled": False},  # weights and optimizer state, ~12 bytes a parameter: disks filled
        "run_dir": args.run_dir or f"/tmp/leagues-bench-loop-{args.shape}-{world}gpu-{int(time.time())}",
        "obs": {"console": False, "tensorboard": False},
        "report": False,
    }
    history = train(from_dict(TrainConfig, overrides))
    if rank == 0:
        row = summarize(history, args, world) | {
            "engine_sleep": args.engine_sleep,
            "routing_replay": args.routing_replay,
            "deterministic": args.deterministic,
            "engine_graphs": args.engine_graphs,
            "kv_cache_fraction": args.kv_cache_fraction,
            "warm_start": args.warm_start,
            "model": args.path,
        }
        row["copy_gb_per_s"] = round(copy_gb_per_s(), 1) if torch.cuda.is_available() else None
        write_row(row, "loop.jsonl")
    shutdown_distributed()


if __name__ == "__main__":
    main()
