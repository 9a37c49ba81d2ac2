"""HTTP layer cost: `leagues serve` against the in-process engine, same model, same requests.

C concurrent clients each send R requests (a fixed prompt of P tokens, N new tokens, greedy, eos
ignored) to `/generate` with `stream: true`, so every request also yields its time to first token and
its inter-token gaps. The same requests go through `Engine.generate_async` in-process. Throughput is
generated tokens per second of wall time; the HTTP cost is 1 - server / in-process.

    PYTHONPATH=. python benchmarks/server.py [--model tiny-moe] [--clients 64] [--requests 4] [--new-tokens 64]
"""

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time

import httpx

from leagues.engine import Engine, SamplingParams


def launch(model: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "leagues.cli", "serve", "--model", model, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if m := re.search(r"listening on (http://\S+)", line):
            return proc, m.group(1)
    raise RuntimeError("server did not start")


async def one_streamed(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    start = time.perf_counter()
    stamps, count = [], 0
    async with client.stream("POST", f"{url}/generate", json=body | {"stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
                count = len(json.loads(line[6:])["output_ids"])
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return stamps[0] - start, gaps, count


async def run_server(url: str, args, prompt: list[int]) -> dict:
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True},
    }
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one_streamed(client, url, body)  # warm-up
        start = time.perf_counter()
        tasks = [one_streamed(client, url, body) for _ in range(args.clients * args.requests)]
        results = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    ttft = [r[0] for r in results]
    gaps = [g for r in results for g in r[1]]
    tokens = sum(r[2] for r in results)
    return dict(
        tokens_per_s=round(tokens / seconds, 1),
        ttft_ms_p50=round(statistics.median(ttft) * 1e3, 1),
        itl_ms_p50=round(statistics.median(gaps) * 1e3, 2) if gaps else None,
    )


async def run_engine(engine: Engine, args, prompt: list[int]) -> dict:
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    await engine.generate_async(prompt, params)
    start = time.perf_counter()
    outs = await asyncio.gather(*[engine.generate_async(prompt, params) for _ in range(args.clients * args.requests)])
    seconds = time.perf_counter() - start
    return dict(tokens_per_s=round(sum(len(o[0].token_ids) for o in outs) / seconds, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    prompt = [(7 * i) % 90 + 5 for i in range(args.prompt_tokens)]
    engine = Engine(args.model)
    in_process = asyncio.run(run_engine(engine, args, prompt))
    engine.close()
    proc, url = launch(args.model)
    try:
        served = asyncio.run(run_server(url, args, prompt))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    cost = 1 - served["tokens_per_s"] / in_process["tokens_per_s"]
    row = dict(
        model=args.model,
        clients=args.clients,
        requests=args.clients * args.requests,
        new_tokens=args.new_tokens,
        in_process=in_process,
        server=served,
        http_cost=round(cost, 3),
        date=time.strftime("%F"),
    )
    print(json.dumps(row))
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "server.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
