"""GPU correctness checks of the engine's kernels and paths (bf16), printed as JSON lines.

- Triton paged decode against the torch reference;
- FlashAttention varlen over gathered paged KV (a cached prefix) against the paged prefill reference;
- the engine with CUDA graphs against eager, and its logprobs against a full forward of the model.

    PYTHONPATH=. python benchmarks/engine_check.py
"""

import json
import os
import tempfile

import torch

from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.engine import Engine, SamplingParams
from leagues.kernels.paged_attention import gather_kv, paged_decode, paged_prefill_reference
from leagues.model import ForwardBatch, load_pretrained
from leagues.model.attention import varlen_causal

OUT = os.path.join(os.environ.get("OUT", "/tmp"), "engine_check.jsonl")


def log(**row):
    print(json.dumps(row), flush=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def random_cache(num_blocks=64, size=16, heads=4, dim=64):
    k = torch.randn(num_blocks, size, heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return k, v


def check_kernels():
    k, v = random_cache()
    lens = [1, 15, 16, 17, 100, 300]
    perm = torch.randperm(64, device="cuda").to(torch.int32)
    tables = torch.stack([perm[i * 10 : i * 10 + 20] if i * 10 + 20 <= 64 else perm[:20] for i in range(len(lens))])
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), 16, 64, device="cuda", dtype=torch.bfloat16)
    fast = paged_decode(q, k, v, tables, ctx, 0.125, impl="triton")
    ref = paged_decode(q, k, v, tables, ctx, 0.125, impl="reference")
    log(check="paged_decode_triton_vs_reference", rel=rel(fast, ref))
    q_lens = [1, 15, 16, 40, 100, 7]
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    qp = torch.randn(sum(q_lens), 16, 64, device="cuda", dtype=torch.bfloat16)
    ctx2 = torch.tensor([max(a, b) for a, b in zip(lens, q_lens, strict=True)], dtype=torch.int32, device="cuda")
    ref = paged_prefill_reference(qp, k, v, tables, cu_q, ctx2, 0.125)
    ks, vs, cu_k = gather_kv(k, v, tables, ctx2)
    fast = varlen_causal(qp, ks, vs, cu_q, cu_k, max(q_lens), int(ctx2.max()))
    log(check="varlen_over_gathered_kv_vs_paged_prefill_reference", rel=rel(fast, ref))


def check_engine(path: str):
    prompts = torch.randint(0, 32000, (24, 40), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [p[: 10 + i] for i, p in enumerate(prompts)]
    params = SamplingParams(temperature=0.8, seed=5, max_new_tokens=24, ignore_eos=True)
    results = {}
    for name, options in {"graphs": {}, "eager": {"cuda_graphs": False}}.items():
        engine = Engine(path, max_model_len=512, kv_cache_fraction=0.3, **options)
        results[name] = engine.generate(prompts, params)
        engine.close()
        del engine
        torch.cuda.empty_cache()
    same = sum(a.token_ids == b.token_ids for a, b in zip(results["graphs"], results["eager"], strict=True))
    log(check="engine_graphs_vs_eager_sampled_outputs", identical=same, of=len(prompts))
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda").eval()
    diffs = []
    for p, o in zip(prompts, results["graphs"], strict=True):
        ids = torch.tensor(p + o.token_ids, device="cuda")
        with torch.inference_mode():
            logits = model.run(ForwardBatch.packed(ids, [len(ids)])).logits_TV.float()
        lp = torch.log_softmax(logits / 0.8, dim=-1)[len(p) - 1 : -1].gather(1, ids[len(p) :, None])[:, 0]
        diffs.append((lp.cpu() - torch.tensor(o.logprobs)).abs())
    diffs = torch.cat(diffs)
    log(check="engine_logprobs_vs_full_forward_bf16", mean_abs=diffs.mean().item(), max_abs=diffs.max().item())


def main():
    check_kernels()
    path = tempfile.mkdtemp()
    make_checkpoint(BASE | SHAPES["anchor"] | {"num_hidden_layers": 4}, path)
    check_engine(path)


if __name__ == "__main__":
    main()
