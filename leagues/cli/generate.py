"""`leagues generate`: load a checkpoint and print a greedy or sampled continuation of a prompt.

Where it sits: a user-facing check that a model and tokenizer load and produce text, and (through
`leagues run`) the main job until the RL loop exists. It is not the rollout engine: each new token
re-runs the full forward over the whole sequence (no KV cache, batch of one), so its cost grows with
the square of the length. That is fine for a smoke test and wrong for anything else; `leagues/engine/`
replaces it.

Decisions:
- Temperature 0 means greedy (argmax); otherwise softmax(logits / temperature) is sampled with a
  `torch.Generator` seeded from the config, so a run is repeatable on a given device.
- With `chat` on and a tokenizer that has a chat template, the prompt becomes one user turn plus the
  generation prompt; without a template the raw prompt is used and a note says so.
- `leagues.model` and torch are imported inside the functions that need them, so `leagues --help`
  stays fast and works while the model package is unavailable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from leagues.cli import UsageError

if TYPE_CHECKING:
    import torch

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass(kw_only=True, slots=True)
class GenerateConfig:
    """One prompt, one continuation."""

    model: str = "tiny-moe"
    """Checkpoint directory in HF format, or the name of a built-in model (`tiny-moe`)."""
    prompt: str = "The quick brown fox"
    """Text to continue."""
    chat: bool = False
    """Wrap the prompt as a user turn with the tokenizer's chat template (when it has one)."""
    max_new_tokens: int = 32
    """Most tokens to generate; generation also stops at the tokenizer's eos token."""
    temperature: float = 0.0
    """Sampling temperature; 0 is greedy decoding."""
    seed: int = 0
    """Seed of the sampling generator."""
    device: str = "cpu"
    """Torch device to run on (`cpu`, `cuda`, `cuda:1`)."""
    dtype: Dtype = "float32"
    """Dtype the weights are loaded in."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")


@dataclass(kw_only=True, slots=True)
class GenerateResult:
    prompt_text: str
    """The prompt as the model saw it (after the chat template, if any)."""
    text: str
    """The decoded continuation."""
    num_prompt_tokens: int
    num_new_tokens: int
    seconds: float
    """Wall time of generation alone, without loading."""


def resolve_model_dir(model: str):
    """The checkpoint directory of `model`, or a `UsageError` naming what is missing."""
    from leagues.model import resolve_model_path

    try:
        path = resolve_model_path(model)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if not path.is_dir():
        raise UsageError(f"model directory not found: {path}")
    return path


def generate(cfg: GenerateConfig) -> GenerateResult:
    """Load `cfg.model` and continue `cfg.prompt`."""
    import torch

    from leagues.model import load_pretrained, load_tokenizer

    path = resolve_model_dir(cfg.model)
    model = load_pretrained(path, dtype=getattr(torch, cfg.dtype), device=cfg.device).eval()
    tok = load_tokenizer(path)
    prompt_text = _format_prompt(tok, cfg.prompt, chat=cfg.chat)
    prompt_ids = tok.encode(prompt_text, add_special_tokens=False)
    if not prompt_ids:
        raise UsageError("prompt: empty after tokenization")
    generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    start = time.perf_counter()
    new_ids = decode_loop(model, prompt_ids, cfg, eos_token_id=tok.eos_token_id, generator=generator)
    seconds = time.perf_counter() - start
    return GenerateResult(
        prompt_text=prompt_text,
        text=tok.decode(new_ids, skip_special_tokens=True),
        num_prompt_tokens=len(prompt_ids),
        num_new_tokens=len(new_ids),
        seconds=seconds,
    )


def _format_prompt(tok, prompt: str, *, chat: bool) -> str:
    if not chat:
        return prompt
    if not getattr(tok, "chat_template", None):
        print("leagues: note: the tokenizer has no chat template; using the raw prompt", file=sys.stderr)
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def decode_loop(
    model, prompt_ids: list[int], cfg: GenerateConfig, *, eos_token_id: int | None, generator: torch.Generator
) -> list[int]:
    """Append one token at a time, re-running the full forward each step (no KV cache)."""
    import torch

    ids_BT = torch.tensor([prompt_ids], dtype=torch.long, device=cfg.device)
    new_ids: list[int] = []
    with torch.inference_mode():
        for _ in range(cfg.max_new_tokens):
            logits_V = model(ids_BT)[0, -1].float()
            if cfg.temperature == 0:
                next_id = int(logits_V.argmax())
            else:
                probs_V = torch.softmax(logits_V / cfg.temperature, dim=-1)
                next_id = int(torch.multinomial(probs_V, 1, generator=generator))
            if next_id == eos_token_id:
                break
            new_ids.append(next_id)
            ids_BT = torch.cat([ids_BT, ids_BT.new_tensor([[next_id]])], dim=1)
    return new_ids


def run_generate(cfg: GenerateConfig) -> int:
    """The `leagues generate` verb: the continuation on stdout, a summary on stderr."""
    result = generate(cfg)
    print(result.text)
    print(summary_line(result), file=sys.stderr)
    return 0


def summary_line(result: GenerateResult) -> str:
    rate = result.num_new_tokens / result.seconds if result.seconds > 0 else float("inf")
    return (
        f"{result.num_prompt_tokens} prompt tokens, {result.num_new_tokens} new tokens "
        f"in {result.seconds:.2f} s ({rate:.1f} tok/s, full forward per token)"
    )
