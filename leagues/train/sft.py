"""Supervised fine-tuning on prompt/response JSONL with the RL trainer.

SFT is the trainer's REINFORCE loss with advantage 1 on every response token, i.e. the mean
negative log-likelihood of the responses (token-mean over the global batch). Prompts go through the
tokenizer's chat template as one user turn (when it has one, unless `chat` is off); the response is
followed by the eos token so the model learns to stop. The RL loop uses this to warm-start a task.
"""

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from leagues.model import load_tokenizer, read_config, resolve_model_path, save_pretrained
from leagues.train.losses import LossConfig
from leagues.train.trainer import Trainer, TrainerConfig
from leagues.types import Sample


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    model: str = "tiny-moe"
    """Checkpoint directory or built-in model name."""
    data: str = ""
    """JSONL file with one prompt/response pair per line."""
    prompt_key: str = "prompt"
    response_key: str = "response"
    chat: bool = True
    """Format prompts with the tokenizer's chat template (when it has one)."""
    epochs: int = 1
    batch_size: int = 16
    """Samples per optimizer step."""
    seed: int = 0
    out: str | None = None
    """Directory for the final HF checkpoint (none: not saved; single process only for now)."""
    nproc: int = 1
    """Ranks to start on this node (`torchrun` underneath); FSDP2 shards the model over them."""
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(loss=LossConfig(policy_loss="reinforce")))
    nnodes: int = 1
    """Nodes of the job (torchrun's static rendezvous): run the same command on each, with its own node_rank."""
    node_rank: int = 0
    """This node's place, 0..nnodes-1 (ranks are numbered node by node)."""
    rdzv_endpoint: str = ""
    """HOST:PORT of node 0 that every node reaches (needed with nnodes > 1)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "nproc"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def read_pairs(path: str, prompt_key: str, response_key: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs; a malformed line raises naming file, line and field."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"SFT data file not found: {path!r}")
    pairs = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        for key in (prompt_key, response_key):
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key]:
                raise ValueError(f"{path}:{lineno}: field {key!r} must be a non-empty string")
        pairs.append((row[prompt_key], row[response_key]))
    if not pairs:
        raise ValueError(f"{path}: no prompt/response pairs (the file is empty)")
    return pairs


def make_samples(
    tokenizer, pairs: list[tuple[str, str]], chat: bool, max_len: int | None = None, where=lambda i: f"pair {i + 1}"
) -> list[Sample]:
    """Token ids of each pair (the response ends with eos); a pair longer than `max_len` tokens (the model's
    context) raises naming it (`where(index)`: its file and line, say)."""
    samples = []
    for index, (prompt, response) in enumerate(pairs):
        if chat and getattr(tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            response_ids.append(tokenizer.eos_token_id)
        if max_len is not None and len(prompt_ids) + len(response_ids) > max_len:
            raise ValueError(
                f"{where(index)}: {len(prompt_ids) + len(response_ids)} tokens, over the model's context of {max_len}"
            )
        samples.append(Sample(prompt_ids=prompt_ids, response_ids=response_ids, advantage=1.0))
    return samples


def _pair_lines(path: str) -> list[int]:
    """The line number of each pair of a JSONL file (`read_pairs` skips blank lines)."""
    return [n for n, line in enumerate(Path(path).read_text().splitlines(), start=1) if line.strip()]


def run_sft(cfg: SFTConfig, log=print) -> list[float]:
    """Train; returns the loss of every step. The data is read and checked before the model is built."""
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    pairs, lines = read_pairs(cfg.data, cfg.prompt_key, cfg.response_key), _pair_lines(cfg.data)
    where = lambda i: f"{cfg.data}:{lines[i]}"  # noqa: E731
    samples = make_samples(tokenizer, pairs, cfg.chat, read_config(model_path).max_seq_len, where)
    trainer = Trainer(model_path, cfg.trainer)
    rng = random.Random(cfg.seed)
    losses = []
    for epoch in range(cfg.epochs):
        order = list(range(len(samples)))
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            batch = [samples[i] for i in order[start : start + cfg.batch_size]]
            metrics = trainer.train_step(batch[trainer.rank :: trainer.world])  # each rank brings its share
            losses.append(metrics["loss"])
            if trainer.rank == 0:
                loss, norm = metrics["loss"], metrics["grad_norm"]
                log(f"epoch {epoch} step {trainer.step}: loss {loss:.4f} grad_norm {norm:.3f}")
    if cfg.out and trainer.mesh is None:
        save_pretrained(trainer.model, cfg.out)
        tokenizer.save_pretrained(cfg.out)
    return losses
