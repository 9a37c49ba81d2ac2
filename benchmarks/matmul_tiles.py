"""Deterministic mode's dense product (`batch_invariant.matmul_nt`) under other tile shapes: does a row's result
keep its bits, and what does each shape cost at decode sizes? One GPU.

Deterministic mode runs every product with one pinned tile shape (`MM_BLOCK_*`), 128 x 128, so a decode row
takes a dozen programs where the default path runs a GEMV. A smaller tile in M or N keeps the K loop (and so,
if the tensor-core instruction sums a K step the same way, each row's bits); this measures whether it does.

One row per (K, N, config) to $OUT/matmul_tiles.jsonl: `config` (block_m, block_n, block_k, warps, stages),
`equal_pinned` (all 300 rows bitwise equal to the pinned shape's), `equal_m1` / `equal_m64` (one row and 64 rows
computed alone equal to the same rows of the full batch), `us_m1` .. `us_m256` (one launch replayed in a CUDA
graph), `max_err` (against a float32 product).

    PYTHONPATH=. python benchmarks/matmul_tiles.py [--shapes 3]
"""

import argparse
import json
import os

import torch

from benchmarks.moe_layer import replay_us
from leagues.kernels import batch_invariant

try:
    import triton
except ImportError:
    triton = None

PINNED = (
    batch_invariant.MM_BLOCK_M,
    batch_invariant.MM_BLOCK_N,
    batch_invariant.MM_BLOCK_K,
    batch_invariant.MM_WARPS,
    batch_invariant.MM_STAGES,
)
CONFIGS = [PINNED, (128, 64, 64, 8, 3), (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (32, 64, 64, 4, 4),
           (16, 64, 64, 4, 4), (16, 32, 64, 2, 4), (16, 128, 64, 4, 3), (16, 32, 64, 1, 4), (16, 16, 64, 1, 4),
           (16, 16, 64, 2, 3), (32, 32, 64, 2, 4), (64, 32, 64, 4, 3)]  # fmt: skip
SHAPES = [(1024, 1536), (1024, 1024), (1024, 32000), (2048, 5120), (2048, 151936)]  # (K, N): qkv, o, LM heads


def matmul(x_MK: torch.Tensor, w_NK: torch.Tensor, config) -> torch.Tensor:
    """`batch_invariant.matmul_nt_triton` with the given tile shape."""
    block_m, block_n, block_k, warps, stages = config
    (num_rows, k), n = x_MK.shape, w_NK.shape[0]
    out_MN = x_MK.new_empty(num_rows, n)
    batch_invariant._matmul_nt_kernel[(triton.cdiv(num_rows, block_m), triton.cdiv(n, block_n))](
        x_MK, w_NK, out_MN, x_MK, x_MK, x_MK, num_rows, n, k, x_MK.stride(0), 0, w_NK.stride(0), out_MN.stride(0),
        GROUPED=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION="tf32", num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    return out_MN


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first this many (K, N) shapes")
    args = parser.parse_args()
    out = os.path.join(os.environ.get("OUT", "/tmp"), "matmul_tiles.jsonl")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for k, n in SHAPES[: args.shapes]:
        w_NK = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.bfloat16) * k**-0.5
        x_MK = torch.randn(300, k, generator=gen, device="cuda", dtype=torch.bfloat16)
        pinned = matmul(x_MK, w_NK, PINNED)
        want = x_MK.float() @ w_NK.float().T
        for config in CONFIGS:
            row = dict(K=k, N=n, config=config, card=torch.cuda.get_device_name())
            try:
                full = matmul(x_MK, w_NK, config)
                row["equal_pinned"] = bool(torch.equal(full, pinned))
                row["equal_m1"] = bool(torch.equal(matmul(x_MK[:1].clone(), w_NK, config)[0], full[0]))
                row["equal_m64"] = bool(torch.equal(matmul(x_MK[:64].clone(), w_NK, config), full[:64]))
                for rows in (1, 8, 64, 256):
                    x = x_MK[:rows].clone()
                    row[f"us_m{rows}"] = round(replay_us(lambda x=x, w=w_NK, c=config: matmul(x, w, c), repeats=50), 1)
                row["max_err"] = float((full.float() - want).abs().max())
            except Exception as err:  # a shape the compiler refuses: report it and go on
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(json.dumps(row), flush=True)
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
