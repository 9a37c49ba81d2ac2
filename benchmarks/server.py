"""The HTTP front's cost: `leagues serve` against the in-process engine, same model, same load.

C clients each send R requests one after another (prompts of P token ids, N new tokens, greedy, eos
ignored; `--prompts distinct`, the default: no two prompts share a cached block, `same`: one prompt, whose
full blocks the engine's prefix cache then holds), so the engine sees at most C requests at a time either way.
In-process, the clients are coroutines calling `Engine.generate_async` (time to first token from the engine's
`on_token`); over HTTP they post to `/generate`, streaming or not, from several client processes (so the benchmark's
own parsing does not limit the server). Each client first sends W requests one after another untimed
(`--warmup-requests`, 2), on both sides:
the engine compiles and captures batch shapes on first use, and over HTTP arrivals stagger, so the warm-up
takes the shapes the timed part will. Throughput is generated tokens per second of wall time;
`http_cost = 1 - server / in-process`.

One row per (clients, stream) to $OUT/server.jsonl (keys `clients`, `stream`, `in_process_tokens_per_s`,
`server_tokens_per_s`, `http_cost`, `ttft_ms_p50` (streaming), `in_process_ttft_ms_p50`, `itl_ms_p50`,
`latency_ms_p50`, `prompts`, `rows_per_step` and `in_process_rows_per_step` (tokens the engine sampled a step),
`front_ttft_ms_mean` and `engine_ttft_ms_mean` (the server's own means of time to first token, from its front's
arrival and from its engine's: where a request's wait is), `in_process_engine_ttft_ms_mean`, `to_engine_ms_mean`
and `from_engine_ms_mean` (the server's means of the hops between its front and its engine's loop),
`inbox_ms_mean` and `in_process_inbox_ms_mean` (the engine's mean wait of a request in its loop's inbox: the
engine's part of the hop to it), `front_cpu_share` and `engine_proc_cpu_share` (CPU seconds a second of the timed
part of the server's front processes together and of its engine's: 1.0 is one core busy throughout), `front`
(`process`: the server's engine in its own process, `leagues serve`'s default; `thread`: on a thread of the
server's process, with `--engine_process false`), `fronts` (front processes, `--fronts`), plus the card and the
load).

    PYTHONPATH=. python benchmarks/server.py [--model tiny-moe] [--clients 8,64] [--stream both] [--requests 4]
        [--warmup-requests 2]
        [--new-tokens 128] [--client-procs 4] [--profile] [--engine.FIELD VALUE ...]

`--engine.FIELD VALUE` (an `EngineConfig` field, as `leagues serve` takes it) goes to both engines; other
unknown options go to `leagues serve` alone (`--engine_process false`, `--fronts 4`).

`--profile` runs the server under py-spy (which must be on PATH), sampling only the threads that hold a GIL (the
engine's process too), and writes $OUT/server-profile.txt: each thread's share of the GIL while serving and its
top frames.
"""

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import multiprocessing as mp
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import httpx


def launch(model: str, extra: list[str], prefix: str = "") -> tuple[subprocess.Popen, str]:
    cmd = [*prefix.split(), sys.executable, "-m", "leagues.cli", "serve", "--model", model, "--port", "0", *extra]
    # a session of its own: the server, its engine's process and a profiler over them stop together (`stop`)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        if m := re.search(r"listening on (http://\S+)", line):
            return proc, m.group(1)
        lines.append(line)
    raise RuntimeError("server did not start:\n" + "".join(lines[-40:]))


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the server's whole session (a profiler over it writes its file), then SIGKILL if it lingers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# --- HTTP clients (in their own processes) ------------------------------------------------------------


async def _one(client: httpx.AsyncClient, url: str, body: dict, stream: bool) -> dict:
    start = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/generate", json=body)
        response.raise_for_status()
        end = time.perf_counter()
        return {"latency": end - start, "tokens": len(response.json()["output_ids"]), "start": start, "end": end}
    stamps, count = [], 0
    async with client.stream("POST", f"{url}/generate", json=body | {"stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                new = len(json.loads(line[6:])["output_ids"])
                now = time.perf_counter()
                stamps += [now] * (new - count)  # a chunk may bring several tokens: they arrived together
                count = new
    return _streamed(start, stamps, time.perf_counter(), count)


def vary(ids: list[int], k: int) -> list[int]:
    """Prompt number k of distinct prompts (`--prompts distinct`): its first three ids count k, so no two prompts
    of a run share a cached block."""
    return [5 + k % 90, 5 + (k // 90) % 90, 5 + (k // 8100) % 90, *ids[3:]]


def _streamed(start: float, stamps: list[float], end: float, tokens: int) -> dict:
    """One streamed request's record: time to first token, gaps between tokens, latency, tokens, start and end."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "ttft": stamps[0] - start,
        "gaps": gaps,
        "latency": end - start,
        "tokens": tokens,
        "start": start,
        "end": end,
    }


async def _clients(
    url: str, body: dict, stream: bool, clients: int, load: tuple[int, int], go: float, first: int | None
) -> list[dict]:
    """`first`: distinct prompts numbered from it (None: the same prompt every time)."""
    warmup, requests = load
    numbers = itertools.count(first) if first is not None else None

    def body_of() -> dict:
        return body if numbers is None else body | {"input_ids": vary(body["input_ids"], next(numbers))}

    async def client_loop(client, count: int):
        return [await _one(client, url, body_of(), stream) for _ in range(count)]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # the connections, and a warm engine: the batch shapes of this load (arrivals as staggered as in the timed
        # part) compiled and captured before timing
        await asyncio.gather(*[client_loop(client, warmup) for _ in range(clients)])
        while time.time() < go:  # every process starts its load at the same moment
            await asyncio.sleep(0.001)
        per_client = await asyncio.gather(*[client_loop(client, requests) for _ in range(clients)])
    return [r for rs in per_client for r in rs]


def _client_process(args: tuple, out) -> None:
    results = asyncio.run(_clients(*args))
    offset = time.time() - time.perf_counter()  # perf_counter is per process: report wall-clock times
    out.put([r | {"start": r["start"] + offset, "end": r["end"] + offset} for r in results])


def run_server(
    url: str,
    body: dict,
    stream: bool,
    clients: int,
    load: tuple[int, int],
    procs: int,
    first: int | None,
    cpu_of: dict[str, list[int]] | None = None,
) -> dict:
    """`clients` clients over `procs` processes, each sending `load` = (warm-up, timed) requests one after another;
    the summary of the timed ones, with the server's own means over them (`_server_side`) and, for each process of
    `cpu_of` (name: pids), `{name}_cpu_share`: their CPU seconds (all threads) per second of the timed part (1.0: one
    core busy throughout)."""
    procs = max(1, min(procs, clients))
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    go = time.time() + 5.0 + 0.5 * load[0]  # the processes' imports and warm-up requests are done by then
    starts = [None if first is None else first + 10_000 * i for i in range(procs)]
    workers = [
        ctx.Process(target=_client_process, args=((url, body, stream, c, load, go, start), out))
        for c, start in zip(shares, starts, strict=True)
    ]
    for w in workers:
        w.start()
    time.sleep(max(go - time.time() - 0.05, 0))
    before, cpu_before, start = _metrics(url), {k: _cpu_s(p) for k, p in (cpu_of or {}).items()}, time.monotonic()
    results = [r for _ in workers for r in out.get()]
    wall = time.monotonic() - start
    shares = {f"{k}_cpu_share": round((_cpu_s(p) - cpu_before[k]) / wall, 3) for k, p in (cpu_of or {}).items()}
    for w in workers:
        w.join()
    return _summary(results) | _server_side(before, _metrics(url)) | shares


def _cpu_s(pids: list[int]) -> float:
    """Processes' CPU seconds so far, user and system, all their threads (Linux's /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _front_pids(server_pid: int, engine_pid: int | None) -> list[int]:
    """The server's front processes: the server's own, and with `--fronts N` its children but the engine (the
    server's process then only watches them)."""
    with open(f"/proc/{server_pid}/task/{server_pid}/children") as f:
        children = [int(p) for p in f.read().split()]
    return [server_pid, *(p for p in children if p != engine_pid)]


def _metrics(url: str) -> dict[str, float]:
    """The server's Prometheus samples, by name (unlabelled ones)."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (\S+)$", text, re.M)}


def _mean_ms(before: dict, after: dict, name: str) -> float | None:
    count = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
    total = after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)
    return round(total / count * 1e3, 1) if count else None


def _server_side(before: dict, after: dict) -> dict:
    """Means over the timed requests, as the server measured them: time to first token from the front's arrival
    (`front_ttft_ms_mean`) and from the engine's (`engine_ttft_ms_mean`). Client TTFT minus the front's is
    HTTP and the client; the front's minus the engine's is the hops to the engine (`to_engine_ms_mean`, to its loop
    taking the request) and back (`from_engine_ms_mean`, the first token)."""
    return {
        "front_ttft_ms_mean": _mean_ms(before, after, "leagues_time_to_first_token_seconds"),
        "engine_ttft_ms_mean": _mean_ms(before, after, "leagues_engine_time_to_first_token_seconds"),
        "to_engine_ms_mean": _mean_ms(before, after, "leagues_front_to_engine_seconds"),
        "from_engine_ms_mean": _mean_ms(before, after, "leagues_engine_to_front_seconds"),
    }


def _summary(results: list[dict]) -> dict:
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = [r["ttft"] for r in results if "ttft" in r]
    gaps = [g for r in results for g in r.get("gaps", [])]
    return {
        "tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 1),
        "ttft_ms_p50": round(statistics.median(ttft) * 1e3, 1) if ttft else None,
        "itl_ms_p50": round(statistics.median(gaps) * 1e3, 2) if gaps else None,
        "latency_ms_p50": round(statistics.median(r["latency"] for r in results) * 1e3, 1),
    }


# --- where the server's time goes ----------------------------------------------------------------------------


def summarise_profile(raw: str, out: str, top: int = 25) -> None:
    """py-spy's collapsed stacks (`--threads --gil`) as each thread's share of the GIL, with its top frames
    (self and inclusive); start-up imports left out."""
    per_thread: collections.Counter = collections.Counter()
    own, within = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    with open(raw) as f:
        lines = f.readlines()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not count.isdigit() or "_find_and_load" in stack:
            continue
        frames = stack.split(";")
        at = next((i for i, f in enumerate(frames) if f.startswith("thread")), None)
        thread = frames[at].split(":")[-1].strip() if at is not None else "?"
        frames = [re.sub(r" \(.*?([^/]+\.py):\d+\)", r" (\1)", f) for f in frames[(at or 0) + 1 :]]
        per_thread[thread] += int(count)
        if frames:
            own[thread][frames[-1]] += int(count)
        for frame in set(frames):
            within[thread][frame] += int(count)
    total = sum(per_thread.values()) or 1
    with open(out, "w") as f:
        for thread, n in per_thread.most_common():
            f.write(f"== {thread}: {n} samples holding the GIL ({100 * n / total:.1f}%)\n  self:\n")
            f.writelines(f"    {100 * k / n:5.1f}%  {frame[:140]}\n" for frame, k in own[thread].most_common(top))
            f.write("  inclusive:\n")
            f.writelines(f"    {100 * k / n:5.1f}%  {frame[:140]}\n" for frame, k in within[thread].most_common(top))


def _server_stats(url: str) -> dict:
    return httpx.get(f"{url}/get_server_info", timeout=30).json()["stats"]


def _inbox_ms(before: dict, after: dict) -> float | None:
    """The mean time a request waited in the engine's inbox (for its loop to end a step) over a run: the engine's
    part of the front-to-engine hop; the rest is the pipe and each side's threads waiting for their GIL."""
    requests = after["requests"] - before["requests"]
    return round((after["inbox_wait_s"] - before["inbox_wait_s"]) / requests * 1e3, 2) if requests else None


def _rows_per_step(before: dict, after: dict) -> float:
    """Tokens the engine sampled per step over a run (warm-up round included, on both sides): fewer than the
    clients means the batch the engine saw was smaller, or steps went to prompts alone."""
    steps = after["steps"] - before["steps"]
    return round((after["generated_tokens"] - before["generated_tokens"]) / max(steps, 1), 2)


def engine_overrides(serve_args: list[str]) -> dict:
    """The `--engine.FIELD VALUE` pairs given for the server, for the in-process engine too (same engine both
    sides)."""
    from leagues.engine.config import EngineConfig

    types = {f.name: f.type for f in dataclasses.fields(EngineConfig)}
    out = {}
    for flag, value in zip(serve_args, serve_args[1:], strict=False):
        if flag.startswith("--engine."):
            name = flag.removeprefix("--engine.")
            kind = types[name]
            out[name] = value == "true" if kind in (bool, "bool") else int(value) if kind in (int, "int") else value
    return out


# --- the same load in-process ---------------------------------------------------------------------------


async def run_engine(engine, prompt: list[int], params, clients: int, load: tuple[int, int], first: int | None) -> dict:
    """`first`: distinct prompts numbered from it (None: the same prompt every time)."""
    warmup, requests = load
    engine_ttft: list[float] = []
    numbers = itertools.count(first) if first is not None else None

    async def one():
        stamps: list[float] = []
        start = time.perf_counter()
        ids = prompt if numbers is None else vary(prompt, next(numbers))
        outs = await engine.generate_async(ids, params, on_token=lambda *_: stamps.append(time.perf_counter()))
        engine_ttft.append(outs[0].first_token_time - outs[0].arrival_time)
        return _streamed(start, stamps, time.perf_counter(), len(outs[0].token_ids))

    async def client_loop(count: int):
        return [await one() for _ in range(count)]

    await asyncio.gather(*[client_loop(warmup) for _ in range(clients)])  # as the HTTP clients warm up
    del engine_ttft[:]
    per_client = await asyncio.gather(*[client_loop(requests) for _ in range(clients)])
    mean = round(statistics.fmean(engine_ttft) * 1e3, 1)
    return _summary([r for rs in per_client for r in rs]) | {"engine_ttft_ms_mean": mean}


def _front(serve_args: list[str]) -> str:
    """Where the server's engine ran: `process` (its own, the default) or `thread` (`--engine_process false`)."""
    pairs = dict(zip(serve_args, serve_args[1:], strict=False))
    return "thread" if pairs.get("--engine_process") == "false" else "process"


def _row(args, c: int, stream: bool, served: dict, mine: dict, card: str) -> dict:
    return dict(
        clients=c,
        stream=stream,
        in_process_tokens_per_s=mine["tokens_per_s"],
        server_tokens_per_s=served["tokens_per_s"],
        http_cost=round(1 - served["tokens_per_s"] / mine["tokens_per_s"], 3),
        ttft_ms_p50=served["ttft_ms_p50"],
        in_process_ttft_ms_p50=mine["ttft_ms_p50"],
        itl_ms_p50=served["itl_ms_p50"],
        in_process_itl_ms_p50=mine["itl_ms_p50"],
        latency_ms_p50=served["latency_ms_p50"],
        in_process_latency_ms_p50=mine["latency_ms_p50"],
        front_ttft_ms_mean=served["front_ttft_ms_mean"],
        engine_ttft_ms_mean=served["engine_ttft_ms_mean"],
        in_process_engine_ttft_ms_mean=mine["engine_ttft_ms_mean"],
        to_engine_ms_mean=served["to_engine_ms_mean"],
        from_engine_ms_mean=served["from_engine_ms_mean"],
        inbox_ms_mean=served["inbox_ms_mean"],
        in_process_inbox_ms_mean=mine["inbox_ms_mean"],
        rows_per_step=served["rows_per_step"],
        front_cpu_share=served.get("front_cpu_share"),
        engine_proc_cpu_share=served.get("engine_proc_cpu_share"),
        front=_front(args.serve_extra),
        fronts=int(dict(zip(args.serve_extra, args.serve_extra[1:], strict=False)).get("--fronts", 1)),
        stream_interval=int(
            dict(zip(args.serve_extra, args.serve_extra[1:], strict=False)).get("--stream_interval", 1)
        ),
        in_process_rows_per_step=mine["rows_per_step"],
        requests=c * args.requests,
        warmup_requests=c * args.warmup_requests,
        prompt_tokens=args.prompt_tokens,
        prompts=args.prompts,
        new_tokens=args.new_tokens,
        client_procs=args.client_procs,
        model=args.model,
        card=card,
        date=time.strftime("%F"),
        tag=args.tag,
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-moe")
    parser.add_argument("--clients", default="8,64")
    parser.add_argument("--stream", default="both", choices=["true", "false", "both"])
    parser.add_argument("--requests", type=int, default=4, help="requests a client sends, one after another")
    parser.add_argument("--warmup-requests", type=int, default=2, help="untimed requests a client sends first")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--client-procs", type=int, default=4, help="processes the HTTP clients are spread over")
    parser.add_argument("--prompts", default="distinct", choices=["distinct", "same"])
    parser.add_argument("--tag", default="")
    parser.add_argument("--profile", action="store_true", help="py-spy the server (GIL view): $OUT/server-profile.txt")
    args, serve_extra = parser.parse_known_args()
    args.serve_extra = serve_extra
    import torch

    from leagues.engine import Engine, SamplingParams

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    prompt = [(7 * i) % 90 + 5 for i in range(args.prompt_tokens)]  # within the character vocabulary
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens, ignore_eos=True)
    body = {
        "input_ids": prompt,
        "sampling_params": {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True},
    }
    clients = [int(c) for c in args.clients.split(",")]
    streams = {"true": [True], "false": [False], "both": [True, False]}[args.stream]
    engine = Engine(args.model, **engine_overrides(serve_extra))
    in_process, runs = {}, itertools.count()
    distinct = args.prompts == "distinct"
    for c in clients:
        before = dict(engine.stats)
        first = 100_000 * next(runs) if distinct else None
        in_process[c] = asyncio.run(run_engine(engine, prompt, params, c, (args.warmup_requests, args.requests), first))
        in_process[c]["rows_per_step"] = _rows_per_step(before, engine.stats)
        in_process[c]["inbox_ms_mean"] = _inbox_ms(before, engine.stats)
    engine.close()
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT", "/tmp")
    raw = os.path.join(out_dir, "server-profile.raw")
    prefix = f"py-spy record --threads --subprocesses --gil --rate 250 --format raw -o {raw} --" if args.profile else ""
    proc, url = launch(args.model, serve_extra, prefix)
    engine_pid = httpx.get(f"{url}/get_server_info", timeout=30).json().get("engine_pid")
    cpu_of = {} if args.profile else {"front": _front_pids(proc.pid, engine_pid)}  # under the profiler: py-spy's
    cpu_of |= {"engine_proc": [engine_pid]} if engine_pid is not None else {}
    try:
        for c in clients:
            for stream in streams:
                before = _server_stats(url)
                load = (args.warmup_requests, args.requests)
                first = 100_000 * next(runs) if distinct else None
                served = run_server(url, body, stream, c, load, args.client_procs, first, cpu_of)
                after = _server_stats(url)
                served["rows_per_step"], served["inbox_ms_mean"] = (
                    _rows_per_step(before, after),
                    _inbox_ms(before, after),
                )
                row = _row(args, c, stream, served, in_process[c], card)
                print(json.dumps(row), flush=True)
                with open(os.path.join(out_dir, "server.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        stop(proc)
    if args.profile and os.path.exists(raw):
        summarise_profile(raw, os.path.join(out_dir, "server-profile.txt"))
        os.remove(raw)  # tens of MB


if __name__ == "__main__":
    main()
