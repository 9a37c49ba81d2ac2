"""Trainer throughput: leagues' `Trainer` (GRPO loss, packed micro-batches, FSDP2 + expert parallel)
against `transformers`' model of the same family under plain FSDP2, on 1..N GPUs.

Run one configuration per launch (the JSON row goes to $OUT/trainer.jsonl from rank 0):

    PYTHONPATH=. torchrun --standalone --nproc-per-node N benchmarks/trainer.py --impl leagues --ep N
    PYTHONPATH=. torchrun --standalone --nproc-per-node N benchmarks/trainer.py --impl transformers

Synthetic GRPO batch: per rank `--samples` samples of `--prompt-len` (256) prompt + `--response-len` (768)
response tokens with random advantages; micro-batches of `--microbatch-tokens` (16,384, the trainer's default)
packed tokens. A step is the trainer's whole `train_step` (forward, backward, AdamW). MFU counts matmul FLOPs as
in `train_step.py` over a measured bf16 matmul peak. transformers: the same checkpoint in bf16 compute / fp32 master
weights via FSDP2 per decoder layer, batches of as many 1,024-token rows as a micro-batch holds, the same token-mean
policy-gradient loss.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from benchmarks.train_step import BASE, SHAPES, flops_per_token, make_checkpoint, matmul_peak_tflops
from leagues.cli.launch import shutdown_distributed


def synthetic_samples(num: int, vocab: int, seed: int, prompt: int, response: int):
    from leagues.types import Sample

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num, prompt + response), generator=gen)
    adv = torch.randn(num, generator=gen)
    return [
        Sample(
            prompt_ids=row[:prompt].tolist(),
            response_ids=row[prompt:].tolist(),
            advantage=float(a),
            rollout_logprobs=[-1.0] * response,
        )
        for row, a in zip(ids, adv, strict=True)
    ]


def leagues_step(args, path, rank, vocab):
    from leagues.parallel import ParallelConfig
    from leagues.train import LossConfig, OptimConfig, Trainer, TrainerConfig

    cfg = TrainerConfig(
        loss=LossConfig(policy_loss="ppo", eps_clip_high=0.28, off_policy="token_tis"),
        optim=OptimConfig(lr=1e-6),
        parallel=ParallelConfig(ep=args.ep, activation_checkpointing=args.ac, grad_accumulation=args.grad_accumulation),
        max_tokens_per_microbatch=args.microbatch_tokens,
        compile=args.compile,
    )
    trainer = Trainer(path, cfg)
    samples = synthetic_samples(args.samples, vocab, rank, args.prompt_len, args.response_len)
    return lambda: trainer.train_step(samples)


def transformers_step(args, path, rank, vocab):
    import transformers
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).train()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if cuda else torch.float32, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=cuda)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, vocab, (args.samples, args.prompt_len + args.response_len), generator=gen).to(device)
    adv = torch.randn(args.samples, generator=gen).to(device)
    per_mb = max(1, args.microbatch_tokens // (args.prompt_len + args.response_len))
    total = args.samples * args.response_len * dist.get_world_size()

    def step():
        for start in range(0, args.samples, per_mb):
            x = ids[start : start + per_mb]
            logits = model(input_ids=x[:, :-1]).logits.float()
            logp = torch.log_softmax(logits, -1).gather(-1, x[:, 1:, None])[..., 0][:, args.prompt_len - 1 :]
            loss = -(logp * adv[start : start + per_mb, None]).sum() / total * dist.get_world_size()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--impl", choices=["leagues", "transformers"], default="leagues")
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=768)
    parser.add_argument("--microbatch-tokens", type=int, default=16384, help="the trainer's default")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--grad-accumulation", default="unsharded", choices=["sharded", "unsharded"])
    parser.add_argument("--path", default=None, help="checkpoint dir (default: /tmp/leagues-bench-trainer-SHAPE)")
    parser.add_argument("--profile", action="store_true", help="also profile one step; table to $OUT")
    args = parser.parse_args()
    args.path = args.path or f"/tmp/leagues-bench-trainer-{args.shape}"
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    hf = BASE | SHAPES[args.shape]
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(args.path, "config.json")):
        make_checkpoint(hf, args.path)
    dist.barrier()
    build = leagues_step if args.impl == "leagues" else transformers_step
    step = build(args, args.path, dist.get_rank(), hf["vocab_size"])
    start = time.perf_counter()
    for _ in range(2):
        step()
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    length = args.prompt_len + args.response_len
    tokens_per_gpu = args.samples * (length - 1) / seconds
    peak = matmul_peak_tflops() if cuda else float("nan")
    tflops = flops_per_token(hf, length) * tokens_per_gpu / 1e12
    row = dict(
        impl=args.impl,
        shape=args.shape,
        gpus=dist.get_world_size(),
        ep=args.ep if args.impl == "leagues" else 0,
        compile=args.compile and args.impl == "leagues",
        grad_accumulation=args.grad_accumulation if args.impl == "leagues" else None,
        # one rank: no FSDP, bf16 compute copies of the float32 masters (leagues.parallel.compute)
        layout=("copies" if dist.get_world_size() == 1 else "fsdp2") if args.impl == "leagues" else "fsdp2",
        samples_per_gpu=args.samples,
        prompt_len=args.prompt_len,
        response_len=args.response_len,
        step_s=round(seconds, 3),
        tokens_per_s_per_gpu=round(tokens_per_gpu),
        tflops_per_gpu=round(tflops, 1),
        mfu=round(tflops / peak, 4) if cuda else None,
        peak_mem_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        warmup_s=round(warmup_s, 1),
        gpu=torch.cuda.get_device_name() if cuda else "cpu",
    )
    if dist.get_rank() == 0:
        print(json.dumps(row), flush=True)
        with open(os.path.join(os.environ.get("OUT", "/tmp"), "trainer.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.profile:
        profile_step(step, args, row)
    shutdown_distributed()


def profile_step(step, args, row) -> None:
    """One profiled step: top kernels by GPU time and top ops by CPU time, to $OUT (rank 0)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if dist.get_rank() != 0:
        return
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    name = f"profile-{args.impl}-{args.shape}-{row['gpus']}gpu.txt"
    with open(os.path.join(os.environ.get("OUT", "/tmp"), name), "w") as f:
        f.write(
            json.dumps(row) + f"\nkernels {kernels}, GPU busy {gpu_us / 1e3:.1f} ms of {row['step_s'] * 1e3:.1f} ms\n"
        )
        f.write(events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=80))
        f.write(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=80))


if __name__ == "__main__":
    main()
