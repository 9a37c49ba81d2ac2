"""Rollout engine throughput against `transformers` `generate` and against the roofline floor.

One GPU, bf16, a Qwen3-MoE model with random weights (the ANCHORS.md shape by default). Measured in
one run, on the same checkpoint and prompts:
- greedy parity: the engine's first 32 greedy tokens against HF `generate` for 16 prompts;
- decode: B prompts of 64 tokens, N new tokens (eos ignored, temperature 1 by default: the RL case), at
  B = 1, 8, 64, 256 and N = 128, 1024; the decode step is the N-token run's time from its first token on the
  host to its end, / (N - 1) (`step_ms_by_difference`: (the N-token run - a 1-token run) / (N - 1), the
  figure before 2026-12-05, which a prefill slower in the 1-token run than in the N-token run understated);
  HF `generate` runs the same prompts with the same N where asked (`--hf-batches`, `--hf-new-tokens`);
- deterministic mode: the same decode rows with `deterministic=True` for the batches of `--det-batches`;
- prefill: 64 prompts of 512 tokens, one new token, the prefix cache emptied before each of 3 timed calls (the
  median), against HF's forward on the same batch.

Rows carry the keys `shape`, `batch`, `new_tokens`, `temperature`, `step_ms`, `floor_ms`, `tokens_per_s`,
`hf_tokens_per_s` (when HF ran), `deterministic`.

Floor of a decode step at batch B: max(bytes / copy bandwidth, FLOPs / matmul peak), both measured
here. Bytes = attention and LM-head weights + the experts the batch touches (expected distinct
experts per layer E·(1-(1-K/E)^B)) + router + the KV cache read (B × context × 2 × L × G × A × 2).
FLOPs = 2 × active matmul parameters × B.

    PYTHONPATH=. python benchmarks/engine.py [--shape anchor] [--batches 1,8,64,256] [--new-tokens 128,1024]
        [--overlap on|off|both] [--gemv-rows N] [--moe-block-rows 16|64]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.engine import Engine, SamplingParams
from leagues.kernels import fused_moe, gemv

OUT = os.environ.get("OUT", "/tmp")


def log(path, **row):
    print(json.dumps(row), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def ceilings() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), medians of timed runs."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * x.numel() / _time(lambda: y.copy_(x)), 2 * 8192**3 / _time(lambda: a @ b)


def _time(fn, iters=20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def decode_floor(hf: dict, batch: int, context: int, bandwidth: float, peak: float) -> float:
    d, h, g, a = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    e, k, f, n = hf["num_experts"], hf["num_experts_per_tok"], hf["moe_intermediate_size"], hf["num_hidden_layers"]
    attn, expert, lm_head = d * a * (2 * h + 2 * g), 3 * d * f, d * hf["vocab_size"]
    touched = e * (1 - (1 - k / e) ** batch)
    weight_bytes = 2 * (n * (attn + touched * expert + e * d) + lm_head)
    kv_bytes = batch * context * 2 * n * g * a * 2
    flops = 2 * batch * (n * (attn + k * expert + e * d) + lm_head)
    return max((weight_bytes + kv_bytes) / bandwidth, flops / peak)


def prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (num, length), generator=gen).tolist()


def engine_time(engine: Engine, batch: list[list[int]], new_tokens: int, temperature: float = 0.0) -> float:
    return engine_times(engine, batch, new_tokens, temperature)[0]


def engine_times(engine: Engine, batch, new_tokens: int, temperature: float = 0.0) -> tuple[float, float]:
    """(seconds of the whole call, seconds from the first token on the host to the end): the second is the
    decode steps alone, whatever the prefill cost."""
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, ignore_eos=True, seed=0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = engine.generate(batch, params)
    torch.cuda.synchronize()
    end = time.perf_counter()
    return end - start, time.monotonic() - min(o.first_token_time for o in outputs)


def _uncached_time(engine: Engine, batch) -> float:
    """Seconds of a one-token call after the prefix cache is emptied: a prefill of the whole prompts (the same
    prompts again would replay their cached blocks, a prefill of one token each)."""
    engine.flush_cache()
    return engine_time(engine, batch, 1)


def hf_generate_time(model, batch: list[list[int]], new_tokens: int, temperature: float) -> float:
    ids = torch.tensor(batch, device="cuda")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0) if temperature > 0 else dict(do_sample=False)
    kwargs = dict(attention_mask=torch.ones_like(ids), pad_token_id=0) | sampling
    model.generate(ids[:, :8], max_new_tokens=2, min_new_tokens=2, **kwargs | {"attention_mask": None})
    torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def parity(engine: Engine, model, vocab: int, out: str) -> None:
    batch = [p[: 16 + 3 * i] for i, p in enumerate(prompts(16, 64, vocab, seed=1))]
    got = engine.generate(batch, SamplingParams(temperature=0, max_new_tokens=32, ignore_eos=True))
    matches, gaps = [], []
    for p, o in zip(batch, got, strict=True):
        ids = torch.tensor([p], device="cuda")
        ref = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        same = next((i for i, (x, y) in enumerate(zip(o.token_ids, ref, strict=True)) if x != y), 32)
        matches.append(same)
        if same < 32:  # how close was the call? HF's own logits for both candidates at that position
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + ref[:same]], device="cuda")).logits[0, -1].float()
            top2 = logits.topk(2).values
            gaps.append(
                dict(
                    position=same,
                    hf_logit_ours_minus_hf_pick=round((logits[o.token_ids[same]] - logits[ref[same]]).item(), 5),
                    hf_top2_gap=round((top2[0] - top2[1]).item(), 5),
                    logit_scale=round(logits.abs().max().item(), 3),
                )
            )
    log(
        out,
        check="greedy_parity_bf16",
        prompts=16,
        tokens=32,
        identical_prompts=sum(m == 32 for m in matches),
        first_divergence=matches,
        divergences=gaps,
    )


def decode_rows(engine, model, hf, args, ceilings_, deterministic: bool, batches) -> None:
    overlaps = {"on": [True], "off": [False], "both": [True, False]}[args.overlap]
    for overlap in overlaps:
        engine.stepper.overlap = overlap  # read at every launch
        _decode_rows(engine, model, hf, args, ceilings_, deterministic, batches, overlap)


def _decode_rows(engine, model, hf, args, ceilings_, deterministic: bool, batches, overlap: bool) -> None:
    bandwidth, peak = ceilings_
    hf_batches = {int(b) for b in args.hf_batches.split(",") if b} if overlap or deterministic else set()
    hf_new = {int(n) for n in args.hf_new_tokens.split(",") if n}
    for new_tokens in (int(n) for n in args.new_tokens.split(",")):
        for batch_size in batches:
            batch = prompts(batch_size, 64, hf["vocab_size"], seed=batch_size)
            engine_time(engine, batch, 4, args.temperature)  # warm-up
            prefill = engine_time(engine, batch, 1, args.temperature)
            total, decoding = engine_times(engine, batch, new_tokens, args.temperature)
            step = decoding / (new_tokens - 1)
            floor = decode_floor(hf, batch_size, 64 + new_tokens // 2, bandwidth, peak)
            row = dict(
                what="decode",
                shape=args.shape,
                batch=batch_size,
                new_tokens=new_tokens,
                temperature=args.temperature,
                deterministic=deterministic,
                overlap=overlap,
                gemv_rows=gemv.MAX_ROWS,
                moe_block_rows=fused_moe.WIDE_BLOCKS[1],
                step_ms=round(step * 1e3, 3),
                step_ms_by_difference=round((total - prefill) / (new_tokens - 1) * 1e3, 3),
                floor_ms=round(floor * 1e3, 3),
                step_over_floor=round(step / floor, 2),
                tokens_per_s=round(batch_size / step),
                total_tokens_per_s=round(batch_size * new_tokens / total),
            )
            if not deterministic and batch_size in hf_batches and new_tokens in hf_new:
                hf_s = hf_generate_time(model, batch, new_tokens, args.temperature)
                row |= dict(
                    hf_tokens_per_s=round(batch_size * new_tokens / hf_s, 1),
                    speedup_vs_hf=round(hf_s / total, 2),
                )
            log(args.out, **row)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--new-tokens", default="128,1024")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--hf-batches", default="1,64")
    parser.add_argument("--hf-new-tokens", default="128")
    parser.add_argument("--det-batches", default="1,64")
    parser.add_argument("--kv-fraction", type=float, default=0.3)
    parser.add_argument("--compile-model", default="auto")
    parser.add_argument("--no-parity", action="store_true")
    parser.add_argument("--overlap", default="on", choices=["on", "off", "both"], help="overlap scheduling")
    parser.add_argument(
        "--gemv-rows",
        type=int,
        default=gemv.MAX_ROWS,
        help="decode steps of at most this many rows run the GEMV projections (0: the library GEMM)",
    )
    parser.add_argument(
        "--moe-block-rows",
        type=int,
        default=fused_moe.WIDE_BLOCKS[1],
        help="rows of the default tiled MoE's expert blocks from `fused_moe.WIDE_BLOCKS` pairs an expert up (16: as "
        "with fewer)",
    )
    parser.add_argument("--out", default=os.path.join(OUT, "engine.jsonl"))
    return parser.parse_args()


def prefill_row(engine: Engine, model, vocab: int, args) -> None:
    """64 prompts of 512 tokens, the prefix cache emptied before each of three timed calls, against HF's forward."""
    batch = prompts(64, 512, vocab, seed=3)
    engine_time(engine, batch, 1)
    prefill = statistics.median(_uncached_time(engine, batch) for _ in range(3))
    ids = torch.tensor(batch, device="cuda")
    with torch.inference_mode():
        hf_prefill = _time(lambda: model(input_ids=ids), iters=3)
    log(
        args.out,
        what="prefill",
        shape=args.shape,
        tokens=64 * 512,
        tokens_per_s=round(64 * 512 / prefill),
        hf_forward_tokens_per_s=round(64 * 512 / hf_prefill),
        ratio_vs_hf_forward=round(hf_prefill / prefill, 2),
    )


def deterministic_rows(path: str, model, hf: dict, args, ceilings_, options: dict) -> None:
    det_batches = [int(b) for b in args.det_batches.split(",") if b]
    if not det_batches:
        return
    t0 = time.perf_counter()
    engine = Engine(path, deterministic=True, **options)
    log(
        args.out,
        what="engine_start_s",
        shape=args.shape,
        deterministic=True,
        seconds=round(time.perf_counter() - t0, 1),
    )
    decode_rows(engine, model, hf, args, ceilings_, True, det_batches)
    engine.close()


def main():
    args = parse_args()
    gemv.MAX_ROWS = args.gemv_rows  # read when the blocks compile and capture: set before the engine starts
    fused_moe.WIDE_BLOCKS = (fused_moe.WIDE_BLOCKS[0], args.moe_block_rows)
    import transformers

    hf = BASE | SHAPES[args.shape]
    path = tempfile.mkdtemp()
    make_checkpoint(hf, path)
    ceilings_ = ceilings()
    log(
        args.out,
        gpu=torch.cuda.get_device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        shape=args.shape,
        copy_gbps=round(ceilings_[0] / 1e9),
        matmul_tflops=round(ceilings_[1] / 1e12),
        date=time.strftime("%F"),
    )
    options = dict(max_model_len=2048, kv_cache_fraction=args.kv_fraction, compile_model=args.compile_model)
    t0 = time.perf_counter()
    engine = Engine(path, **options)
    log(
        args.out,
        what="engine_start_s",
        shape=args.shape,
        seconds=round(time.perf_counter() - t0, 1),
        compiled=engine.runner.compiled,
        num_blocks=engine.blocks.num_blocks,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    if not args.no_parity:
        parity(engine, model, hf["vocab_size"], args.out)
    decode_rows(engine, model, hf, args, ceilings_, False, [int(b) for b in args.batches.split(",") if b])
    prefill_row(engine, model, hf["vocab_size"], args)
    engine.close()
    del engine
    torch.cuda.empty_cache()
    deterministic_rows(path, model, hf, args, ceilings_, options)


if __name__ == "__main__":
    main()
