"""Tile sizes of the fused MoE kernels (`leagues.kernels.fused_moe`), each configuration replayed in a CUDA graph
on one GPU: the small path's route, gate/up and down at decode batches of at most one (token, expert) pair per
expert (`--tokens`), and the tiled path's gate/up and down at larger decode batches (`--tiled-tokens`).

One row per (shape, kernel, tokens, config) to $OUT/moe_small_tune.jsonl: `shape`, `kernel`, `tokens`,
`config`, `us` (median replay of one launch), `bytes_per_us` (weight bytes the launch reads / time), and one
`best` row per (shape, kernel, tokens) with the default configuration's time beside it.

    PYTHONPATH=. python benchmarks/moe_small_tune.py [--shapes anchor,wide] [--tokens 1,2,4,8]
        [--tiled-tokens 64,256] [--kernels route,gate_up,down,gate_up_tiled,down_tiled] [--block-k 64]
        [--block-m 16,64]
"""

import argparse
import itertools
import json
import os
from functools import partial

import torch

from benchmarks.moe_layer import replay_us
from benchmarks.train_step import BASE, SHAPES
from leagues.kernels import fused_moe

OUT = os.environ.get("OUT", "/tmp")

# at most 128 float32 accumulator elements a thread (more spills); 1 and 2 rows a program: more programs in flight
GATE_UP = [
    dict(block_f=bf, inner_d=bd, warps=(w, 4))
    for bf, bd, w in itertools.product((1, 2, 4, 8, 16, 32), (256, 512, 1024), (1, 2, 4, 8))
    if 2 * bf * bd <= 128 * 32 * w
]
DOWN = [
    dict(block_d=bd, inner_f=bf, warps=(4, w))
    for bd, bf, w in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512), (1, 2, 4, 8))
    if bd * bf <= 128 * 32 * w
]

# the tiled path: output columns and reduction step a program takes, warps, pipeline stages (same for both kernels)
TILED = [
    dict(block_n=bn, block_k=bk, warps=(w, w), stages=(st, st))
    for bn, bk, w, st in itertools.product((16, 32, 64, 128), (32, 64, 128), (1, 2, 4, 8), (2, 3, 4))
    if bn * bk <= 128 * 64 * w // 2 and (bn >= 32 or w <= 2) and (bn < 128 or w >= 2)
]


def route_configs(num_experts: int) -> list[dict]:
    e_pad = 1 << (num_experts - 1).bit_length()
    grid = itertools.product((64, 128, 256, 512, 1024), (2, 4, 8, 16))
    return [dict(block_d=bd, num_warps=w) for bd, w in grid if e_pad * bd <= 128 * 32 * w]


def log(path, **row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="anchor,wide")
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--tiled-tokens", default="64,256")
    parser.add_argument("--kernels", default="route,gate_up,down,gate_up_tiled,down_tiled")
    parser.add_argument("--block-k", type=int, help="the tiled launches at this K step alone (deterministic mode: 64)")
    parser.add_argument("--block-m", default="16", help="the tiled launches' rows of an expert block, each tried")
    parser.add_argument("--out", default=os.path.join(OUT, "moe_small_tune.jsonl"))
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes.split(","):
        hf = BASE | SHAPES[shape]
        d, f, e, k = hf["hidden_size"], hf["moe_intermediate_size"], hf["num_experts"], hf["num_experts_per_tok"]
        bf16 = dict(dtype=torch.bfloat16, device="cuda")
        w13 = torch.randn(e, 2 * f, d, generator=gen, **bf16) * d**-0.5
        w2 = torch.randn(e, d, f, generator=gen, **bf16) * f**-0.5
        router = torch.randn(e, d, generator=gen, **bf16) * d**-0.5
        bias = torch.zeros(e, device="cuda")
        names = args.kernels.split(",")
        small, tiled = [n for n in names if "tiled" not in n], [n for n in names if "tiled" in n]
        for tokens in (int(t) for t in args.tokens.split(",") if small):
            tune(args.out, shape, tokens, gen, w13, w2, router, bias, k, small)
        for tokens in (int(t) for t in args.tiled_tokens.split(",") if tiled):
            block_ms = [int(m) for m in args.block_m.split(",")]
            tune(args.out, shape, tokens, gen, w13, w2, router, bias, k, tiled, args.block_k, block_ms)


def tune(out, shape, tokens, gen, w13, w2, router, bias, k, names, block_k=None, block_ms=(16,)) -> None:
    """Every configuration of the three kernels at `tokens` tokens; the best of each beside the default."""
    (e, two_f, d), f = w13.shape, w2.shape[-1]
    x = torch.randn(tokens, d, generator=gen, dtype=w13.dtype, device="cuda")
    weights, ids, _ = fused_moe.route_triton(x, router, bias, k, True)
    h = torch.randn(tokens * k, f, generator=gen, dtype=w13.dtype, device="cuda")
    tiled = [c | dict(block_m=m) for m in block_ms for c in TILED]
    layouts = {m: fused_moe.align_torch(ids, e, m) for m in {*block_ms, fused_moe.TILED_TILES["block_m"]}}
    kernels = {
        "route": (route_configs(e), partial(_route, x, router, bias, k), e * d * 2),
        "gate_up": (GATE_UP, partial(_gate_up, x, ids, w13, f), tokens * k * two_f * d * 2),
        "down": ([c for c in DOWN if c["inner_f"] <= max(f, 128)], partial(_down, h, ids, weights, w2, d),
                 tokens * k * f * d * 2),
        "gate_up_tiled": (tiled, partial(_gate_up_tiled, x, ids, w13, f), _experts_hit(ids, e) * two_f * d * 2),
        "down_tiled": (tiled, partial(_down_tiled, h, layouts, weights, w2, d),
                       _experts_hit(ids, e) * f * d * 2),
    }  # fmt: skip
    for kernel, (configs, fn, num_bytes) in ((n, kernels[n]) for n in names):
        configs = [c for c in configs if block_k is None or c.get("block_k", block_k) == block_k]
        times = []
        for config in configs:
            us = replay_us(partial(fn, config), repeats=100)
            times.append((us, config))
            log(out, shape=shape, kernel=kernel, tokens=tokens, config=config, us=round(us, 2),
                bytes_per_us=round(num_bytes / us))  # fmt: skip
        default = replay_us(partial(fn, {}), repeats=100)
        us, config = min(times, key=lambda t: t[0])
        log(out, best=True, shape=shape, kernel=kernel, tokens=tokens, config=config, us=round(us, 2),
            default_us=round(default, 2))  # fmt: skip


def _route(x, router, bias, k, c):
    return fused_moe.route_triton(x, router, bias, k, True, **c)


def _gate_up(x, ids, w13, f, c):
    """The gate/up launch alone, as `experts_triton` makes it."""
    h = x.new_empty(ids.numel(), f)
    c = fused_moe.SMALL_TILES | c
    block_f = c["block_f"]
    fused_moe._gate_up_kernel[(ids.numel(), -(-f // block_f))](
        x, ids, w13, h, x.shape[1], f, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), K=ids.shape[1],
        BLOCK_F=block_f, BLOCK_D=min(c["inner_d"], x.shape[1]), num_warps=c["warps"][0],
    )  # fmt: skip
    return h


def _down(h, ids, weights, w2, d, c):
    """The down launch alone, as `experts_triton` makes it."""
    tokens, k = ids.shape
    out = h.new_empty(tokens, d)
    c = fused_moe.SMALL_TILES | c
    block_d = c["block_d"]
    fused_moe._down_kernel[(tokens, -(-d // block_d))](
        h, ids, weights, w2, out, d, h.shape[1], h.stride(0), w2.stride(0), w2.stride(1), out.stride(0), K=k,
        BLOCK_D=block_d, BLOCK_F=min(c["inner_f"], 1 << (h.shape[1] - 1).bit_length()), num_warps=c["warps"][1],
    )  # fmt: skip
    return out


def _experts_hit(ids, num_experts: int) -> int:
    return int(torch.bincount(ids.flatten(), minlength=num_experts).gt(0).sum())


def _gate_up_tiled(x, ids, w13, f, c):
    """The tiled gate/up launch, as `tiled_launches` makes it (each program reading its rows from `expert_rows`)."""
    c = fused_moe.TILED_TILES | c
    e, num_pairs = w13.shape[0], ids.numel()
    num_blocks = -(-num_pairs // c["block_m"]) + e
    sorted_S = torch.empty(num_blocks * c["block_m"], dtype=torch.int32, device=x.device)
    block_expert_B = torch.empty(num_blocks, dtype=torch.int32, device=x.device)
    h = x.new_empty(num_pairs, f)
    table_EP, counts_E = fused_moe.expert_rows(ids, e)
    fused_moe._gate_up_tiled_kernel[(num_blocks, -(-f // c["block_n"]))](
        x, table_EP, counts_E, sorted_S, block_expert_B, w13, h, num_pairs, x.shape[1], f, x.stride(0),
        w13.stride(0), w13.stride(1), h.stride(0), E=e, E_PAD=1 << (e - 1).bit_length(), K=ids.shape[1],
        BLOCK_M=c["block_m"], BLOCK_N=c["block_n"], BLOCK_K=c["block_k"], LAYOUT_GIVEN=False, PRECISION="tf32",
        num_warps=c["warps"][0], num_stages=c["stages"][0],
    )  # fmt: skip
    return h


def _down_tiled(h, layouts, weights, w2, d, c):
    """The tiled down launch alone, as `tiled_launches` makes it (the layout of its block rows given)."""
    c = fused_moe.TILED_TILES | c
    sorted_S, block_expert_B = layouts[c["block_m"]]
    y = torch.empty(h.shape[0], d, dtype=torch.float32, device=h.device)
    fused_moe._down_tiled_kernel[(block_expert_B.shape[0], -(-d // c["block_n"]))](
        h, sorted_S, block_expert_B, weights.contiguous(), w2, y, h.shape[0], d, h.shape[1], h.stride(0),
        w2.stride(0), w2.stride(1), y.stride(0), E=w2.shape[0], BLOCK_M=c["block_m"], BLOCK_N=c["block_n"],
        BLOCK_K=c["block_k"], PRECISION="tf32", num_warps=c["warps"][1], num_stages=c["stages"][1],
    )  # fmt: skip
    return y


if __name__ == "__main__":
    main()
