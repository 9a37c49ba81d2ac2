"""The few-row projection kernel (`leagues.kernels.gemv`) against the library GEMM (`F.linear`, cuBLAS) at decode
row counts, on one GPU, in the same run, and a sweep of its tiles.

Shapes: the projections of `--shapes` that run it (fused q/k/v: (H + 2G) * A x D; output: D x H * A; the MoE
router's logits: E x D). Each timing
replays one CUDA graph that runs the projection once for each of `--layers` distinct weights (as a decode step
runs its layers, so the weights come from memory, not from L2) and reports the time a launch.

One row per (shape, proj, rows, impl, config) to $OUT/gemv_tune.jsonl: `shape`, `proj`, `rows`, `impl`
(`library` or `gemv`), `config`, `us` (median a launch), `bytes_per_us` (weight bytes / time), and one `best`
row per (shape, proj, rows) with `library_us`, `default_us` and `speedup` (library / best).

    PYTHONPATH=. python benchmarks/gemv_tune.py [--shapes anchor,wide] [--rows 1,2,4,8,16] [--layers 24]
"""

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.moe_layer import replay_us
from benchmarks.train_step import SHAPES
from leagues.kernels import gemv

OUT = os.environ.get("OUT", "/tmp")

# at most 128 float32 weight elements a thread in flight (more spills)
CONFIGS = [
    dict(block_n=bn, block_k=bk, num_warps=w)
    for bn, bk, w in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024, 2048), (1, 2, 4, 8))
    if bn * bk <= 128 * 32 * w and bn * bk >= 32 * w
]


def log(path, **row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="anchor,wide")
    parser.add_argument("--rows", default="1,2,4,8,16")
    parser.add_argument("--layers", type=int, default=24, help="distinct weights a replay walks (beyond L2)")
    parser.add_argument("--out", default=os.path.join(OUT, "gemv_tune.jsonl"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes.split(","):
        cfg = SHAPES[shape]
        d, heads, groups, a = (
            cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
        )
        projections = {"qkv": ((heads + 2 * groups) * a, d), "o": (d, heads * a), "router": (cfg["num_experts"], d)}
        for proj, (n, k) in projections.items():
            weights = [
                torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(args.layers)
            ]
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, k, generator=gen, device="cuda", dtype=torch.bfloat16)
                tune(args.out, shape, proj, x, weights)


def tune(out, shape, proj, x, weights) -> None:
    rows, num_bytes = x.shape[0], weights[0].numel() * weights[0].element_size()
    common = dict(shape=shape, proj=proj, rows=rows)

    def timed(fn) -> float:
        return replay_us(lambda: [fn(w) for w in weights], repeats=20) / len(weights)

    library = timed(lambda w: F.linear(x, w))
    log(out, **common, impl="library", config={}, us=round(library, 2), bytes_per_us=round(num_bytes / library))
    times = []
    for config in CONFIGS:
        us = timed(lambda w, c=config: gemv.gemv_triton(x, w, **c))
        times.append((us, config))
        log(out, **common, impl="gemv", config=config, us=round(us, 2), bytes_per_us=round(num_bytes / us))
    default = timed(lambda w: gemv.gemv_triton(x, w))
    us, config = min(times, key=lambda t: t[0])
    log(out, best=True, **common, config=config, us=round(us, 2), library_us=round(library, 2),
        default_us=round(default, 2), speedup=round(library / us, 2))  # fmt: skip


if __name__ == "__main__":
    main()
