"""One MoE layer at decode batch sizes: the fused paths (`leagues.kernels.fused_moe`) against the grouped GEMMs,
each replayed in a CUDA graph (launch costs out), on one GPU.

One row per (shape, tokens, path) to $OUT/moe_layer.jsonl: `shape`, `tokens`, `pairs_per_expert`, `path`
("fused": what the layer picks, "grouped": forced), `mode` (the fused path's choice), `us` (median replay).

    PYTHONPATH=. python benchmarks/moe_layer.py [--shapes anchor,wide] [--tokens 16,64,128,256,512]
"""

import argparse
import json
import os
import statistics

import torch

from benchmarks.train_step import BASE, SHAPES
from leagues.model import config_from_hf
from leagues.model.moe import MoE


def replay_us(fn, repeats: int = 200) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / repeats)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="anchor,wide")
    parser.add_argument("--tokens", default="16,64,128,256,512")
    args = parser.parse_args()
    out = os.path.join(os.environ.get("OUT", "/tmp"), "moe_layer.jsonl")
    for shape in args.shapes.split(","):
        cfg = config_from_hf(BASE | SHAPES[shape] | dict(num_hidden_layers=1))
        layer = MoE(cfg).cuda().bfloat16()
        with torch.no_grad():
            for p in layer.parameters():
                p.normal_(0, 0.02)
        for tokens in (int(t) for t in args.tokens.split(",")):
            x_TD = torch.randn(tokens, cfg.dim, device="cuda", dtype=torch.bfloat16)
            with torch.inference_mode():
                mode = layer._fused(x_TD)
                for path in ("fused", "grouped"):
                    layer.experts.impl = "auto" if path == "fused" else "grouped"
                    row = dict(
                        shape=shape, tokens=tokens, pairs_per_expert=tokens * cfg.top_k / cfg.num_experts, path=path,
                        mode=mode if path == "fused" else None, us=round(replay_us(lambda m=layer, x=x_TD: m(x)), 1),
                        card=torch.cuda.get_device_name(),
                    )  # fmt: skip
                    print(json.dumps(row), flush=True)
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
            layer.experts.impl = "auto"


if __name__ == "__main__":
    main()
