"""The host's own time of an engine decode step, per row, on the CPU: everything a step does but the model.

    PYTHONPATH=. python benchmarks/engine_host.py [--batch 64,256] [--steps 200] [--profile 256] [--stream]

The engine runs a tiny random checkpoint (`SHAPES["smoke"]`) on the CPU, with overlap scheduling on and the
decode path CUDA graphs take: `runner.graphs` holds a stand-in graph per captured size whose `replay` does
nothing (its outputs are fixed random tokens and logprobs), so a step is the host's work alone: scheduling,
filling the decode buffers, sampling inputs, landing (`.tolist()`), post-processing, stop checks and emitting
tokens. B requests of 64 distinct random tokens each (temperature 1, eos ignored) are prefilled for real, then
`engine.step()` runs from this thread (the engine's own thread is closed) and each timed step is one launched
decode. `--stream` gives every request an `on_token` listener (a server's streams); `--profile B` prints a
cProfile top list of B's timed steps.
"""

import argparse
import cProfile
import pstats
import tempfile
import time
from concurrent.futures import Future

import torch

from benchmarks.engine import prompts
from benchmarks.train_step import BASE, SHAPES, make_checkpoint
from leagues.engine import Engine, SamplingParams
from leagues.engine.requests import Add


class _NoGraph:
    """A captured decode graph whose replay costs nothing: its outputs stay as they are."""

    def replay(self) -> None:
        pass


def stand_in_graphs(engine: Engine) -> None:
    """A no-op graph for each of the engine's graph sizes, with fixed random outputs (tokens, logprobs)."""
    vocab, gen = engine.model.config.vocab_size, torch.Generator().manual_seed(0)
    for size in engine.config.graph_batch_sizes:
        outputs = {
            "tokens": torch.randint(0, vocab, (size,), generator=gen),
            "logprobs": -torch.rand(size, generator=gen),
            "logits": torch.zeros(size, vocab),
        }
        engine.runner.graphs[size] = (_NoGraph(), outputs)


def host_ms(engine: Engine, batch: int, steps: int, vocab: int, stream: bool, profile: bool) -> float:
    """Mean ms of a decode step at `batch` rows (after the prefill and a few warm-up steps)."""
    params = SamplingParams(temperature=1.0, max_new_tokens=1900, ignore_eos=True, seed=0)
    streamed = []
    on_token = (lambda i, token, logprob: streamed.append(token)) if stream else None
    for i, prompt in enumerate(prompts(batch, 64, vocab, seed=batch)):
        engine.table.add(Add(f"b{batch}-{i}", prompt, params, Future(), on_token), engine.weight_version)
    for _ in range(10):
        engine.step()  # prefill and warm-up
    assert engine.stepper.inflight is not None and len(engine.stepper.inflight[1]) == batch, "not decoding"
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    if engine.stepper.inflight is not None:
        engine.stepper.land()
    for rid in list(engine.requests):
        engine.table.abort(rid)
    return elapsed / steps * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="64,256")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many runs per batch")
    parser.add_argument("--profile", type=int, default=0, help="a cProfile top list of this batch's steps")
    parser.add_argument("--stream", action="store_true", help="every request has an on_token listener")
    args = parser.parse_args()
    torch.set_num_threads(1)
    hf = BASE | SHAPES["smoke"]
    path = tempfile.mkdtemp()
    make_checkpoint(hf, path)
    engine = Engine(path, device="cpu", max_model_len=2048, overlap_scheduling="true", max_num_seqs=256)
    engine.close()  # drive steps from this thread
    stand_in_graphs(engine)
    for batch in (int(b) for b in args.batch.split(",")):
        runs = [host_ms(engine, batch, args.steps, hf["vocab_size"], args.stream, False) for _ in range(args.repeats)]
        best = min(runs)
        print(f"batch {batch}: {best:.3f} ms/step host, {best / batch * 1e3:.2f} us/row")
        if args.profile == batch:
            host_ms(engine, batch, args.steps, hf["vocab_size"], args.stream, True)


if __name__ == "__main__":
    main()
