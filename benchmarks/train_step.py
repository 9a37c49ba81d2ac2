"""Training-step throughput of `leagues.model` against `transformers` on the same weights and batch.

One process, one GPU, bf16 parameters, a forward, a cross-entropy backward and a fused AdamW step per
iteration, timed with CUDA events after warm-up (median of the timed steps). Both models load the same
HF checkpoint written by leagues. Matmul FLOPs are counted as 6 x (matmul parameters a token touches:
attention projections, router, top-k experts, LM head) per token plus causal attention
(6 x 2 x S x H x A per token per layer: QK^T and PV at half the S x S square, three passes); MFU is that
count over the step time, against a bf16 8192^3 matmul measured in the same run.

Also checks, on the GPU, the grouped-GEMM MoE path against the reference path (forward and grads) and
the varlen attention kernel against the per-sequence SDPA loop.

    PYTHONPATH=. python benchmarks/train_step.py [--shapes anchor,wide] [--steps 10] [--out results.jsonl]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from leagues.model import ForwardBatch, PackedSeqs, Transformer, config_from_hf, load_pretrained, save_pretrained

SHAPES = {
    # The peer-baseline shape of ANCHORS.md: 1.27B total, ~0.21B active.
    "anchor": dict(
        vocab_size=32000,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_experts=64,
        num_experts_per_tok=8,
    ),
    # Qwen3-30B-A3B layers (hidden 2048, 32/4 heads of 128, FFN 768, its vocabulary), 64 experts, 6 layers: 2.5B.
    "wide": dict(
        vocab_size=151936,
        hidden_size=2048,
        num_hidden_layers=6,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_experts=64,
        num_experts_per_tok=8,
    ),
    # CPU smoke test of this script.
    "smoke": dict(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
    ),
}
IMPLS = ("leagues", "leagues_compiled", "transformers")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BASE = dict(
    architectures=["Qwen3MoeForCausalLM"],
    model_type="qwen3_moe",
    hidden_act="silu",
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=8192,
    norm_topk_prob=True,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    tie_word_embeddings=False,
    attention_bias=False,
    dtype="bfloat16",
)


def log(out_path, **row):
    print(json.dumps(row), flush=True)
    with open(out_path, "a") as f:
        f.write(json.dumps(row) + "\n")


def bench_ms(fn, warmup=3, iters=10) -> float:
    """Median milliseconds per call: CUDA events on a GPU, the host clock on the CPU (smoke runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_peak_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    ms = bench_ms(lambda: a @ b, warmup=5, iters=20)
    return 2 * 8192**3 / ms / 1e9


def flops_per_token(hf: dict, seq_len: int) -> float:
    d, h, g, a = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    attn = d * a * (2 * h + 2 * g)
    moe = hf["num_experts"] * d + hf["num_experts_per_tok"] * 3 * d * hf["moe_intermediate_size"]
    matmul_params = hf["num_hidden_layers"] * (attn + moe) + d * hf["vocab_size"]
    attention = hf["num_hidden_layers"] * 2 * seq_len * h * a
    return 6 * matmul_params + 6 * attention


def make_checkpoint(hf: dict, path: str) -> int:
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = Transformer(config_from_hf(hf)).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0, 0.02)
    save_pretrained(model, path)
    return sum(p.numel() for p in model.parameters())


def train_step_fn(model, forward, ids_BT, labels_BT, opt):
    def step():
        logits = forward(model, ids_BT)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels_BT.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_one(impl: str, path: str, ids_BT, labels_BT, steps: int):
    if impl.startswith("leagues"):
        model = load_pretrained(path, dtype=torch.bfloat16, device=DEVICE)
        forward = lambda m, x: m(x)  # noqa: E731
        if impl == "leagues_compiled":
            model.compile_blocks()
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE)
        forward = lambda m, x: m(input_ids=x).logits  # noqa: E731
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=DEVICE == "cuda")
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = bench_ms(train_step_fn(model, forward, ids_BT, labels_BT, opt), warmup=3, iters=steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    extra = {}
    if impl == "transformers":
        extra["experts_impl"] = str(getattr(model.config, "_experts_implementation", None))
        extra["attn_impl"] = str(getattr(model.config, "_attn_implementation", None))
    del model, opt
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return ms, peak, extra


def check_logits(path, ids_BT):
    import transformers

    ours = load_pretrained(path, dtype=torch.bfloat16, device=DEVICE).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(DEVICE).eval()
    with torch.no_grad():
        a, b = ours(ids_BT[:1]).float(), ref(input_ids=ids_BT[:1]).logits.float()
    del ours, ref
    return ((a - b).norm() / b.norm()).item()


def bench_shape(name, batch, seq_len, steps, peak_tflops, out):
    hf = BASE | SHAPES[name]
    path = tempfile.mkdtemp(prefix=f"bench-{name}-")
    num_params = make_checkpoint(hf, path)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids_BT = torch.randint(0, hf["vocab_size"], (batch, seq_len + 1), device=DEVICE, generator=gen)
    ids_BT, labels_BT = ids_BT[:, :-1].contiguous(), ids_BT[:, 1:].contiguous()
    rel = check_logits(path, ids_BT)
    fpt = flops_per_token(hf, seq_len)
    rows = {}
    for impl in IMPLS:
        try:
            ms, mem, extra = run_one(impl, path, ids_BT, labels_BT, steps)
        except Exception as err:  # report and go on: one side failing must not lose the other's figure
            log(out, shape=name, impl=impl, error=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        tokens = batch * seq_len
        tflops = fpt * tokens / ms / 1e9
        rows[impl] = tokens / ms * 1e3
        log(
            out,
            shape=name,
            impl=impl,
            params_b=round(num_params / 1e9, 3),
            batch=batch,
            seq_len=seq_len,
            step_ms=round(ms, 1),
            tokens_per_s=round(tokens / ms * 1e3),
            tflops=round(tflops, 1),
            mfu=round(tflops / peak_tflops, 4),
            peak_mem_gib=round(mem, 1),
            logits_rel_err_vs_hf=round(rel, 5),
            **extra,
        )
    if "transformers" in rows:
        ratios = {k: round(v / rows["transformers"], 2) for k, v in rows.items() if k != "transformers"}
        log(out, shape=name, speedup_vs_transformers=ratios)


def check_kernels(out):
    torch.manual_seed(0)
    hf = BASE | SHAPES["anchor"] | dict(num_hidden_layers=2, vocab_size=1024)
    with torch.device("cuda"):
        model = Transformer(config_from_hf(hf)).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    ids = torch.randint(0, 1024, (4 * 256,), device=DEVICE)
    results = {}
    for impl in ("grouped", "reference"):
        model.set_moe_impl(impl)
        model.zero_grad()
        logits = model.run(ForwardBatch.packed(ids, [256] * 4)).logits_TV
        logits.float().square().mean().backward()
        results[impl] = (logits.float(), model.layers[0].moe.experts.w13.grad.float().clone())
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    log(
        out,
        check="moe_grouped_vs_reference_bf16",
        logits_rel=rel(results["grouped"][0], results["reference"][0]),
        w13_grad_rel=rel(results["grouped"][1], results["reference"][1]),
    )
    q = torch.randn(300, 16, 64, device=DEVICE, dtype=torch.bfloat16)
    k, v = torch.randn(2, 300, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    lengths = [7, 100, 1, 192]
    fast = PackedSeqs.from_lengths(lengths, "cuda", impl="varlen").attend(0, q, k, v)
    ref = PackedSeqs.from_lengths(lengths, "cuda", impl="sdpa_loop").attend(0, q, k, v)
    log(out, check="varlen_vs_sdpa_loop_bf16", rel=rel(fast.float(), ref.float()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="anchor,wide")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "train_step.jsonl"))
    args = parser.parse_args()
    import transformers

    peak = matmul_peak_tflops() if DEVICE == "cuda" else float("nan")
    log(
        args.out,
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        matmul_peak_tflops=round(peak, 1),
        date=time.strftime("%Y-%m-%d"),
    )
    try:
        if DEVICE == "cuda":
            check_kernels(args.out)
    except Exception as err:
        log(args.out, check="kernels", error=f"{type(err).__name__}: {str(err)[:300]}")
    for name in args.shapes.split(","):
        bench_shape(name, args.batch, args.seq_len, args.steps, peak, args.out)


if __name__ == "__main__":
    main()
