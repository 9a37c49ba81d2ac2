"""`leagues generate`: prompts through the rollout engine, with a progress bar and a throughput summary.

Two modes:
- `--prompt TEXT`: one prompt; the continuation goes to stdout.
- `--input prompts.jsonl [--output outputs.jsonl]`: one JSON object per line with the prompt under
  `prompt_key` (a string, a list of token ids, or a list of chat messages); one output object per
  sample, in input order, to `--output` (or stdout). A malformed line is an error naming file, line
  and field.

Decisions:
- The engine does the work (paged KV cache, continuous batching); this file only reads, formats
  and writes. `leagues.engine` and torch are imported inside functions, so `leagues --help` stays fast.
- With `chat` on and a tokenizer that has a chat template, a string prompt becomes one user turn plus
  the generation prompt; a list of messages always goes through the template.
- Output records carry token ids, logprobs, finish reason and the weight version, the fields an RL
  pipeline needs; the summary counts generated tokens over generation time.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from leagues.cli import UsageError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """Prompts in, continuations out."""

    model: str = "tiny-moe"
    """Checkpoint directory in HF format, or the name of a built-in model (`tiny-moe`)."""
    prompt: str = "The quick brown fox"
    """Text to continue (ignored when `input` is set)."""
    input: str | None = None
    """JSONL file of prompts."""
    output: str | None = None
    """JSONL file for the outputs (default: stdout)."""
    prompt_key: str = "prompt"
    """Field of each input line that holds the prompt."""
    chat: bool = False
    """Wrap string prompts as a user turn with the tokenizer's chat template (when it has one)."""
    max_new_tokens: int = 32
    """Most tokens to generate per sample."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    top_p: float = 1.0
    top_k: int = -1
    n: int = 1
    """Samples per prompt."""
    seed: int = 0
    """Seed of every request (sample i of a prompt uses a seed derived from it and i)."""
    device: str = "auto"
    """Torch device (`auto`, `cpu`, `cuda`)."""
    dtype: Dtype = "auto"
    """Dtype the weights are loaded in (`auto`: bfloat16 on cuda, float32 on cpu)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")


@dataclass(kw_only=True, slots=True)
class GenerateResult:
    records: list[dict[str, Any]]
    num_prompt_tokens: int
    num_new_tokens: int
    seconds: float
    """Wall time of generation alone, without loading."""


def resolve_model_dir(model: str) -> Path:
    """The checkpoint directory of `model`, or a `UsageError` naming what is missing."""
    from leagues.model import resolve_model_path

    try:
        return resolve_model_path(model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def read_prompts(path: str, key: str) -> list[Any]:
    """Prompts of a JSONL file; a bad line raises naming file, line and field."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"input file not found: {path}")
    prompts = []
    for lineno, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict) or key not in row:
            raise UsageError(f"{path}:{lineno}: missing field {key!r}")
        if not isinstance(row[key], str | list) or not row[key]:
            raise UsageError(f"{path}:{lineno}: field {key!r} must be a non-empty string, token list or message list")
        prompts.append(row[key])
    return prompts


def format_prompt(tok, prompt: Any, chat: bool) -> str | list[int]:
    """Token ids stay as they are; messages and (with `chat`) strings go through the chat template."""
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if isinstance(prompt, str) and not chat:
        return prompt
    if not getattr(tok, "chat_template", None):
        raise UsageError("chat prompts need a tokenizer with a chat template")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Run every prompt through a fresh engine."""
    from leagues.engine import Engine, SamplingParams

    path = resolve_model_dir(cfg.model)
    engine = Engine(path, device=cfg.device, dtype=cfg.dtype)
    try:
        raw = read_prompts(cfg.input, cfg.prompt_key) if cfg.input else [cfg.prompt]
        prompts = [format_prompt(engine.tokenizer, p, cfg.chat) for p in raw]
        params = SamplingParams(
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            n=cfg.n,
            seed=cfg.seed,
            max_new_tokens=cfg.max_new_tokens,
        )
        start = time.perf_counter()
        outputs = _run_with_progress(engine, prompts, params, cfg.progress)
        seconds = time.perf_counter() - start
    except ValueError as e:
        raise UsageError(str(e)) from None
    finally:
        engine.close()
    records = [_record(o) for o in outputs]
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs[:: cfg.n])
    return GenerateResult(
        records=records,
        num_prompt_tokens=num_prompt,
        num_new_tokens=sum(len(o.token_ids) for o in outputs),
        seconds=seconds,
    )


def _run_with_progress(engine, prompts, params, show: bool):
    from rich.progress import Progress

    with Progress(transient=True, disable=not show, console=_stderr_console()) as progress:
        task = progress.add_task("generating", total=len(prompts))
        return engine.generate(prompts, params, on_output=lambda _: progress.advance(task))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def _record(o) -> dict[str, Any]:
    return {
        "request_id": o.request_id,
        "index": o.index,
        "text": o.text,
        "token_ids": o.token_ids,
        "logprobs": [round(x, 6) for x in o.logprobs],
        "finish_reason": str(o.finish_reason),
        "prompt_tokens": len(o.prompt_token_ids),
        "weight_version": o.weight_version,
    }


def run_generate(cfg: GenerateConfig) -> int:
    """The `leagues generate` verb: text (one prompt) or JSONL records out, a summary on stderr."""
    result = generate(cfg)
    if cfg.output:
        lines = "".join(json.dumps(r) + "\n" for r in result.records)
        Path(cfg.output).write_text(lines)
    elif cfg.input:
        for record in result.records:
            print(json.dumps(record))
    else:
        for record in result.records:
            print(record["text"])
    print(summary_line(result), file=sys.stderr)
    return 0


def summary_line(result: GenerateResult) -> str:
    rate = result.num_new_tokens / result.seconds if result.seconds > 0 else float("inf")
    return (
        f"{len(result.records)} outputs, {result.num_prompt_tokens} prompt tokens, "
        f"{result.num_new_tokens} new tokens in {result.seconds:.2f} s ({rate:.1f} tok/s)"
    )
