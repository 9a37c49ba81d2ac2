"""The scale run (issue: scale run): a Qwen3-30B-A3B-shaped MoE through the main job, colocated, with the trainer
expert parallel over every GPU.

The model is the Qwen3-30B-A3B architecture (hidden 2048, 32 query / 4 KV heads of 128, experts of FFN 768
top-8, vocabulary 151,936) with random bf16 weights, written once as an HF checkpoint; `--layers` and
`--experts` shrink it to what the lent GPUs hold (48 and 128 are the real model). The job is
`leagues.loop.train`: GRPO on the built-in arithmetic task, `--prompts` × `--samples` per step, responses
up to `--max-response-len` tokens; the engine sleeps while the trainer trains. `--steps` steps are timed,
after two warm-up steps (compilation, graph capture); the run writes no checkpoints (~12 bytes a parameter).

Reported (one JSON row in $OUT/scale.jsonl, rank 0):
- step time and its breakdown (rollout, reward, train, sync, sleep/wake);
- end-to-end tokens/s per GPU: prompt and response tokens of every sample, over the step time;
- rollout tokens/s per GPU against a floor: each decode step reads every weight once (a batch of hundreds
  of sequences touches every expert), so at the copy bandwidth measured in the same run a GPU cannot
  exceed `sequences in flight x bandwidth / weight bytes` tokens/s;
- trainer MFU: 6 x active parameters x tokens (plus causal attention) for the gradient pass and 2 x for the
  logprob pass, over the train time and the card's dense bf16 peak;
- weight-sync time, peak memory per GPU, and the mismatch metrics.

The whole Qwen3-30B-A3B (61 GB of bf16 weights) leaves no room on an 80 GB card for a full engine beside the
trainer: `--engine-ep` splits the experts over the engines (each holds 1/world of them, stepping in lockstep).
`--plan GPUS` prints what each GPU would hold for the given flags, without a run or a GPU; on 8 GPUs the
trainer's resident state is 76.8 GB a GPU with unsharded gradient accumulation and 62.7 GB with
`--grad-accumulation sharded` (1.6 GB with `--cpu-offload`, 61 GB a rank then in host memory), before
activations, the engine's 10.3 GB of weights (`--engine-ep`) and its KV cache.

    PYTHONPATH=. torchrun --standalone --nproc-per-node N benchmarks/scale.py [--layers 48] [--experts 128]
    PYTHONPATH=. torchrun --standalone --nproc-per-node 2 benchmarks/scale.py --smoke   # CPU check
    PYTHONPATH=. python benchmarks/scale.py --plan 8 --engine-ep --grad-accumulation sharded
"""

import argparse
import os
import shutil
import statistics

import torch
import torch.distributed as dist

from benchmarks.loop import copy_gb_per_s, summarize, write_row
from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.cli.launch import init_distributed, shutdown_distributed
from leagues.config import from_dict
from leagues.loop import TrainConfig, train
from leagues.model import config_from_hf
from leagues.model.tokenizer import write_tiny_tokenizer
from leagues.parallel import format_plan, trainer_memory

QWEN3_30B_A3B = dict(
    vocab_size=151936,
    hidden_size=2048,
    num_hidden_layers=48,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    intermediate_size=6144,
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    max_position_embeddings=4096,
)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense, SXM


def parameter_counts(hf: dict) -> tuple[int, int]:
    """(total, active per token) parameters of a Qwen3-MoE config (norms left out: negligible)."""
    dim, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
    q, kv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    attention = dim * (q + 2 * kv) + q * dim
    expert = 3 * dim * hf["moe_intermediate_size"]
    router = dim * hf["num_experts"]
    embeddings = 2 * vocab * dim  # untied input and output embeddings
    total = layers * (attention + router + hf["num_experts"] * expert) + embeddings
    active = layers * (attention + router + hf["num_experts_per_tok"] * expert) + embeddings
    return total, active


def train_flops(hf: dict, active: int, tokens: float, seq_len: float, num_seqs: float) -> float:
    """FLOPs of one step's trainer work: a logprob pass (2x) and a gradient pass (6x) over every token,
    plus causal attention (4 * seq^2/2 * heads * head_dim per layer forward, 3x that with backward)."""
    heads_dim = hf["num_attention_heads"] * hf["head_dim"]
    attention_fwd = hf["num_hidden_layers"] * num_seqs * 4 * seq_len * seq_len / 2 * heads_dim
    return (2 + 6) * active * tokens + (1 + 3) * attention_fwd


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-response-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--microbatch-tokens", type=int, default=16384)
    parser.add_argument("--kv-cache-fraction", type=float, default=0.8)
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--offload-engine-weights", action="store_true", help="to host memory while training")
    parser.add_argument("--engine-ep", action="store_true", help="the engines split the experts (lockstep)")
    parser.add_argument("--path", default=None)
    parser.add_argument("--grad-accumulation", choices=("sharded", "unsharded"), default="unsharded")
    parser.add_argument("--cpu-offload", action="store_true", help="the trainer's sharded state in host memory")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: checks this script")
    parser.add_argument("--plan", type=int, default=0, metavar="GPUS", help="print the memory plan for GPUS; no run")
    return parser.parse_args()


def job(args: argparse.Namespace, path: str, run_dir: str, world: int) -> dict:
    """The run's configuration (overrides of `TrainConfig`)."""
    return {
        "model": path,
        "task": "arithmetic",
        "steps": 2 + args.steps,
        "checkpoint": {"enabled": False},
        "rollout": {
            "batch_size": args.prompts,
            "n_samples_per_prompt": args.samples,
            "max_response_len": args.max_response_len,
            "return_routes": True,
        },
        "trainer": {
            "optim": {"lr": 1e-6},
            "loss": {"eps_clip_high": 0.28, "off_policy": "token_tis"},
            "parallel": {
                "ep": world,
                "activation_checkpointing": True,
                "sharded_load": True,
                "grad_accumulation": args.grad_accumulation,
                "cpu_offload": args.cpu_offload,
            },
            "max_tokens_per_microbatch": args.microbatch_tokens,
        },
        "engine": {"kv_cache_fraction": args.kv_cache_fraction},
        "deterministic": args.deterministic,
        "engine_offload_weights": args.offload_engine_weights,
        "engine_ep": args.engine_ep,
        "run_dir": run_dir,
        "obs": {"console": False, "tensorboard": False},
        "report": False,
    }


def figures(history: list[dict], hf: dict, world: int, peaks: list[float]) -> dict:
    """The issue's figures from the run's metrics (the timed steps, as `summarize` picks them)."""
    rows = history[2:]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in rows)  # noqa: E731
    cuda = torch.cuda.is_available()
    total, active = parameter_counts(hf)
    samples, prompt_len = mean("rollout/num_generated"), mean("rollout/prompt_len_mean")
    response_len = mean("rollout/response_len_mean")
    tokens = samples * (prompt_len + response_len)
    step_s, train_s = mean("time/step"), mean("time/train")
    bandwidth = copy_gb_per_s() * 1e9 if cuda else 0.0
    floor = (samples / world) * bandwidth / (2 * total)  # sequences in flight per GPU, one weight read per step
    gpu = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in gpu), 0.0)
    flops = train_flops(hf, active, tokens, prompt_len + response_len, samples)
    return {
        "params_total_b": round(total / 1e9, 2),
        "params_active_b": round(active / 1e9, 2),
        "samples_per_step": samples,
        "prompt_len_mean": round(prompt_len, 1),
        "response_len_mean": round(response_len, 1),
        "e2e_tokens_per_s_per_gpu": round(tokens / step_s / world, 1),
        "rollout_tokens_per_s_per_gpu": round(mean("rollout/tokens_per_s") / world, 1),
        "rollout_floor_tokens_per_s_per_gpu": round(floor, 1),
        "copy_gb_per_s": round(bandwidth / 1e9, 1),
        "trainer_mfu": round(flops / train_s / world / (peak * 1e12), 4) if peak and train_s else None,
        "peak_memory_gib": [round(p, 1) for p in peaks],
    }


def plan(args: argparse.Namespace, hf: dict, world: int) -> str:
    """Per-GPU memory before activations: the trainer's resident state, the engine's weights, and the KV cache
    that every sample of a step in flight at full length would need."""
    cfg = from_dict(TrainConfig, job(args, "", "", world)).trainer.parallel
    trainer = trainer_memory(config_from_hf(hf), cfg, world)
    total, _ = parameter_counts(hf)
    experts = hf["num_hidden_layers"] * hf["num_experts"] * 3 * hf["hidden_size"] * hf["moe_intermediate_size"]
    engine = 2 * (total - experts + experts / (world if args.engine_ep else 1))
    kv_token = hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * hf["head_dim"] * 2
    kv = args.prompts * args.samples / world * args.max_response_len * kv_token
    return (
        f"{world} GPUs, {total / 1e9:.2f}B parameters: trainer {format_plan(trainer)}; engine weights "
        f"{engine / 1e9:.1f} GB; KV cache for every sample at full length {kv / 1e9:.1f} GB"
    )


def main() -> None:
    args = parse_args()
    shape = SHAPES["smoke"] if args.smoke else QWEN3_30B_A3B | {"num_hidden_layers": args.layers}
    shape = shape | ({} if args.smoke else {"num_experts": args.experts})
    hf = BASE | shape | {"eos_token_id": 2, "pad_token_id": 0}
    if args.plan:
        print(plan(args, hf, args.plan))
        return
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    name = "smoke" if args.smoke else f"qwen3-30b-a3b-{args.layers}l-{args.experts}e"
    path = args.path or os.path.join("runs", f"scale-model-{name}")
    run_dir = os.path.join("runs", f"scale-run-{name}-{world}gpu")
    if rank == 0:
        if not os.path.isfile(os.path.join(path, "config.json")):
            make_checkpoint(hf, path)  # the tiny tokenizer: ids past its vocabulary decode to nothing
            write_tiny_tokenizer(path)
        shutil.rmtree(run_dir, ignore_errors=True)
    dist.barrier()
    history = train(from_dict(TrainConfig, job(args, path, run_dir, world)))
    peaks: list[float] = [0.0] * world
    dist.all_gather_object(peaks, torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0)
    if rank == 0:
        row = summarize(history, args, world) | {"model": name} | figures(history, hf, world, peaks)
        flags = ("deterministic", "offload_engine_weights", "engine_ep")
        write_row(row | {flag: getattr(args, flag) for flag in flags}, "scale.jsonl")
    shutdown_distributed()


if __name__ == "__main__":
    main()
