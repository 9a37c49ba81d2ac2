"""Where a leagues training step spends its GPU time: torch.profiler's top kernels for one shape.

PYTHONPATH=. python benchmarks/profile_step.py [--shape anchor] [--compile blocks|none] [--rows 25]
"""

import argparse
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step import BASE, SHAPES, make_checkpoint, train_step_fn
from leagues.model import load_pretrained


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="anchor")
    parser.add_argument("--compile", default="blocks", choices=["blocks", "none"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    hf = BASE | SHAPES[args.shape]
    path = tempfile.mkdtemp()
    make_checkpoint(hf, path)
    model = load_pretrained(path, dtype=torch.bfloat16, device="cuda").train()
    if args.compile == "blocks":
        model.compile_blocks()
    ids = torch.randint(0, hf["vocab_size"], (args.batch, args.seq_len + 1), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    step = train_step_fn(model, lambda m, x: m(x), ids[:, :-1], ids[:, 1:], opt)
    for _ in range(4):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"== {args.shape} compile={args.compile}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
