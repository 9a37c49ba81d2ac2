"""Deterministic mode's kernels against the ordinary ones, in the same run (bf16, one GPU).

For each kernel: milliseconds of the batch-invariant Triton kernel and of the library kernel it replaces,
at decode-sized and training-sized row counts, and whether the invariant kernel's rows are bitwise the
same computed alone (first row) as in the batch. Shapes are the `wide` Qwen3-30B-A3B layer (hidden 2048,
32/4 heads of 128, experts of FFN 768, vocabulary 151,936). One JSON row per measurement goes to
$OUT/batch_invariant.jsonl.

    PYTHONPATH=. python benchmarks/batch_invariant.py
"""

import json
import os

import torch

from benchmarks.train_step import bench_ms
from leagues.kernels import batch_invariant as bi
from leagues.kernels import invariant_attention as ia
from leagues.kernels.grouped_gemm import grouped_mm_fast
from leagues.kernels.paged_attention import paged_decode
from leagues.model.attention import varlen_causal

ROWS = []


def record(kernel: str, shape: str, ours_ms: float, ref_ms: float, invariant: bool, flops: float = 0.0) -> None:
    row = {
        "kernel": kernel,
        "shape": shape,
        "invariant_ms": round(ours_ms, 4),
        "library_ms": round(ref_ms, 4),
        "slowdown": round(ours_ms / ref_ms, 2),
        "first_row_bitwise_equal": invariant,
    }
    if flops:
        row["invariant_tflops"] = round(flops / ours_ms / 1e9, 1)
        row["library_tflops"] = round(flops / ref_ms / 1e9, 1)
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def main() -> None:
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    for n, k, name in ((2048 * 3, 2048, "qkv-ish 6144x2048"), (151936, 2048, "lm head 151936x2048")):
        w = torch.randn(n, k, device=dev, dtype=bf16) * 0.02
        for m in (1, 64, 1024, 8192):
            x = torch.randn(m, k, device=dev, dtype=bf16)
            same = torch.equal(bi.matmul_nt(x[:1], w), bi.matmul_nt(x, w)[:1])
            ours, lib = bench_ms(lambda x=x, w=w: bi.matmul_nt(x, w)), bench_ms(lambda x=x, w=w: x @ w.T)
            record("matmul", f"{name} M={m}", ours, lib, same, 2 * m * n * k)

    experts, top_k, dim, ffn = 64, 8, 2048, 768
    w13 = torch.randn(experts, 2 * ffn, dim, device=dev, dtype=bf16) * 0.02
    for tokens in (8, 4096):
        rows = tokens * top_k
        ids = torch.randint(0, experts, (rows,), device=dev).sort().values
        offs = torch.searchsorted(ids, torch.arange(1, experts + 1, device=dev)).to(torch.int32)
        x = torch.randn(rows, dim, device=dev, dtype=bf16)
        first = int(offs[0]) if int(offs[0]) > 0 else None
        same = first is None or torch.equal(
            bi.grouped_mm(x[:first], w13, torch.full_like(offs, first)), bi.grouped_mm(x, w13, offs)[:first]
        )
        ours = bench_ms(lambda x=x, o=offs: bi.grouped_mm(x, w13, o))
        lib = bench_ms(lambda x=x, o=offs: grouped_mm_fast(x, w13, o))
        record("grouped_mm", f"w13 {experts}x{2 * ffn}x{dim}, {rows} rows", ours, lib, same, 2 * rows * 2 * ffn * dim)

    logits = torch.randn(4096, 151936, device=dev)
    same = torch.equal(bi.log_softmax(logits[:1]), bi.log_softmax(logits)[:1])
    record("log_softmax", "4096x151936 f32", bench_ms(lambda: bi.log_softmax(logits)),
           bench_ms(lambda: torch.log_softmax(logits, -1)), same)  # fmt: skip
    x = torch.randn(8192, dim, device=dev, dtype=bf16)
    norm_w = torch.ones(dim, device=dev, dtype=bf16)
    same = torch.equal(bi.rms_norm(x[:1], norm_w, 1e-6), bi.rms_norm(x, norm_w, 1e-6)[:1])
    record("rms_norm", f"8192x{dim}", bench_ms(lambda: bi.rms_norm(x, norm_w, 1e-6)),
           bench_ms(lambda: bi.rms_norm_reference(x, norm_w, 1e-6)), same)  # fmt: skip

    heads, kv_heads, head_dim = 32, 4, 128
    seqs, seq_len = 16, 1024
    q = torch.randn(seqs * seq_len, heads, head_dim, device=dev, dtype=bf16)
    k = torch.randn(seqs * seq_len, kv_heads, head_dim, device=dev, dtype=bf16)
    v = torch.randn_like(k)
    cu = torch.arange(0, seqs * seq_len + 1, seq_len, device=dev, dtype=torch.int32)
    lengths = (seq_len,) * seqs
    ours = lambda: ia.packed_attention(q, k, v, cu, lengths, None)  # noqa: E731
    flash = lambda: varlen_causal(q, k, v, cu, cu, seq_len, seq_len)  # noqa: E731
    causal_flops = 4 * seqs * seq_len * seq_len / 2 * heads * head_dim
    first = slice(0, seq_len)
    same = torch.equal(ia.packed_attention(q[first], k[first], v[first], cu[:2], lengths[:1], None), ours()[first])
    record("attention prefill", f"{seqs}x{seq_len} tokens, 32/4 heads of 128", bench_ms(ours), bench_ms(flash),
           same, causal_flops)  # fmt: skip

    block, batch, ctx = 16, 256, 1024
    blocks_per = ctx // block
    k_cache = torch.randn(batch * blocks_per, block, kv_heads, head_dim, device=dev, dtype=bf16)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(batch * blocks_per, device=dev, dtype=torch.int32).view(batch, blocks_per)
    lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    q1 = torch.randn(batch, heads, head_dim, device=dev, dtype=bf16)
    cu1 = torch.arange(batch + 1, device=dev, dtype=torch.int32)
    scale = head_dim**-0.5
    one = ia.paged_attention(q1[:1], k_cache, v_cache, cu1[:2], lens[:1], table[:1], scale)
    same = torch.equal(one, ia.paged_attention(q1, k_cache, v_cache, cu1, lens, table, scale)[:1])
    record("attention decode", f"{batch} seqs x {ctx} keys, paged",
           bench_ms(lambda: ia.paged_attention(q1, k_cache, v_cache, cu1, lens, table, scale)),
           bench_ms(lambda: paged_decode(q1, k_cache, v_cache, table, lens, scale)), same)  # fmt: skip

    with open(os.path.join(os.environ.get("OUT", "/tmp"), "batch_invariant.jsonl"), "a") as f:
        for row in ROWS:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
