"""Launch settings of the paged decode kernel (`leagues.kernels.paged_attention.paged_decode_triton`) on one GPU,
each configuration replayed in a CUDA graph, against the copy-bandwidth floor of the keys and values it reads.

A decode step of B sequences at context C, the anchor's attention (16 query heads, 4 KV heads of 64) unless
`--shape` names another, over a paged cache of 16-token blocks scattered at random, with the step's new keys
and values written by the kernel (`new_kv`, as the engine's decode steps run it). One row per (shape, batch,
context, config) to $OUT/decode_tune.jsonl: `us` (median replay of one launch), `floor_us` (K and V bytes /
measured copy bandwidth), `over_floor`; one `best` row per (shape, batch, context) with `decode_tiles`' choice
beside it (`default_us`).

    PYTHONPATH=. python benchmarks/decode_tune.py [--batches 1,8,64,256] [--contexts 128,1088] [--shape anchor]
"""

import argparse
import itertools
import json
import os
from functools import partial

import torch

from benchmarks.engine import ceilings
from benchmarks.moe_layer import replay_us
from benchmarks.train_step import SHAPES
from leagues.kernels.paged_attention import decode_split_tokens, decode_tiles, paged_decode_triton

OUT = os.environ.get("OUT", "/tmp")
CONFIGS = [
    dict(block_n=bn, num_warps=w, num_stages=st)
    for bn, w, st in itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 3, 4))
    if not (bn == 128 and w == 1)
]


def log(path, **row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def case(shape: dict, batch: int, context: int, block_size: int = 16):
    """Inputs of one decode step: q, caches with randomly placed blocks, tables, lengths, the new keys."""
    heads, kv_heads, dim = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"]
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = dict(device="cuda", dtype=torch.bfloat16)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen, **dev)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen, **dev)
    tables = torch.randperm(num_blocks - 1, device="cuda", generator=gen)[: batch * blocks_per_seq]
    tables = tables.view(batch, blocks_per_seq).to(torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    last = context - 1
    slots = (tables[:, last // block_size].long() * block_size + last % block_size).contiguous()
    q = torch.randn(batch, heads, dim, generator=gen, **dev)
    new_kv = (torch.randn(batch, kv_heads, dim, generator=gen, **dev),) * 2 + (slots,)
    return q, k_cache, v_cache, tables, lens, new_kv


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="128,1088")
    args = parser.parse_args()
    out = os.path.join(OUT, "decode_tune.jsonl")
    shape = SHAPES[args.shape]
    bandwidth = ceilings()[0]
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(out, gpu=torch.cuda.get_device_name(), torch=torch.__version__, copy_gbps=round(bandwidth / 1e9))
    for batch, context in itertools.product(
        (int(b) for b in args.batches.split(",")), (int(c) for c in args.contexts.split(","))
    ):
        q, k_cache, v_cache, tables, lens, new_kv = case(shape, batch, context)
        kv_bytes = 2 * batch * context * k_cache.shape[2] * k_cache.shape[3] * k_cache.element_size()
        floor_us = kv_bytes / bandwidth * 1e6
        split = decode_split_tokens(batch, k_cache.shape[2], tables.shape[1] * 16, num_sms)
        inputs = (q, k_cache, v_cache, tables, lens, q.shape[-1] ** -0.5)
        reference = paged_decode_triton(*inputs, new_kv=new_kv)
        times = {}
        for config in CONFIGS:
            if split is not None and split % config["block_n"]:
                continue
            run = partial(paged_decode_triton, *inputs, split_tokens=split, new_kv=new_kv, **config)
            try:
                error = (run().float() - reference.float()).abs().max().item()
                us = replay_us(run)
            except Exception as err:  # a configuration the compiler refuses (shared memory): skip it
                log(out, shape=args.shape, batch=batch, context=context, config=config, error=str(err)[:200])
                continue
            times[json.dumps(config)] = us
            log(
                out, shape=args.shape, batch=batch, context=context, split_tokens=split, config=config,
                us=round(us, 2), floor_us=round(floor_us, 2), over_floor=round(us / floor_us, 2),
                max_error=round(error, 4),
            )  # fmt: skip
        best = min(times, key=times.get)
        chosen = decode_tiles(batch * k_cache.shape[2], split is not None, q.device)
        default = times.get(json.dumps(dict(zip(("block_n", "num_warps", "num_stages"), chosen, strict=True))))
        log(
            out, what="best", shape=args.shape, batch=batch, context=context, split_tokens=split,
            config=json.loads(best), us=round(times[best], 2), default_us=default and round(default, 2),
            floor_us=round(floor_us, 2),
        )  # fmt: skip


if __name__ == "__main__":
    main()
