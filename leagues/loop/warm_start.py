"""SFT warm start of an RL run, and writing the trainer's current weights as an HF checkpoint.

Where it sits: before the first RL step. The run's task gives reference answers (`Task.make_rows`; a
multi-turn task's demonstration conversations give one pair per assistant turn), or the data file has a
response column; the same `Trainer` (REINFORCE loss with advantage 1: the mean NLL of the
responses) takes `steps` optimizer steps on them, and the result is written to `RUN_DIR/warm_start/` as an
ordinary HF checkpoint with its tokenizer, from which the RL trainer, the reference model and the engines
all load. A resumed run finds the checkpoint and skips the warm start.

Decisions:
- A separate `Trainer` (own optimizer and learning rate), discarded afterwards: the RL phase starts with
  fresh optimizer state, as it would from any SFT checkpoint.
- Every trainer rank takes part in gathering the weights (FSDP gathers are collectives); its rank 0 writes them
  into a temporary directory that is renamed into place, so a crash never leaves a half-written checkpoint.
"""

import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from leagues.loop.config import TrainConfig
from leagues.model import load_pretrained, load_tokenizer, save_pretrained
from leagues.parallel import ParallelMesh
from leagues.rollout import make_task
from leagues.train import LossConfig, OptimConfig, Trainer, TrainerConfig
from leagues.train.sft import make_samples, read_pairs


def write_hf(trainer: Trainer, base_model: Path, out: Path, tokenizer) -> Path:
    """The trainer's current full weights as an HF checkpoint at `out` (every trainer rank calls; its rank 0
    writes)."""
    model = load_pretrained(base_model, dtype=torch.float32, device="cpu") if trainer.rank == 0 else None
    params = dict(model.named_parameters()) if model is not None else {}
    with torch.no_grad():
        for bucket in trainer.state_dict_for_sync():
            for name, tensor in bucket:
                if model is not None:
                    params[name].copy_(tensor.to("cpu", torch.float32))
    if model is not None:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(model, tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    if not trainer.alone:
        dist.barrier(group=trainer.group)
    return out


def warm_start_pairs(cfg: TrainConfig, tokenizer=None) -> tuple[list[tuple[str, str]], bool]:
    """(prompt, response) pairs for the warm start, and whether to apply the chat template. A task row with a
    demonstration conversation (`messages`, multi-turn tasks) gives one pair per assistant turn: the chat
    template's rendering of the turns before it, and the turn's text."""
    if cfg.task:
        rows = make_task(cfg.task, cfg.task_params).make_rows(cfg.warm_start.num_rows, cfg.seed, "train", at_most=True)
        if rows and "messages" in rows[0]:
            return [pair for row in rows for pair in conversation_pairs(row["messages"], tokenizer)], False
        return [(row["prompt"], row["response"]) for row in rows], False
    pairs = read_pairs(cfg.data.path, cfg.data.prompt_key, cfg.warm_start.response_key)
    return pairs, cfg.data.chat_template


def conversation_pairs(messages: list[dict], tokenizer) -> list[tuple[str, str]]:
    """One (rendered context, text) pair per assistant message of a conversation."""
    return [
        (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True), m["content"])
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]


def warm_start(cfg: TrainConfig, model_path: Path, run_dir: Path, log=print, mesh: ParallelMesh | None = None) -> Path:
    """Run the SFT warm start (unless its checkpoint exists) and return the checkpoint directory; `mesh`: the
    trainer ranks, when they are some of the job's (see `Trainer`)."""
    out = run_dir / "warm_start"
    if (out / "config.json").is_file():
        log(f"warm start: found {out}, skipping")
        return out
    tokenizer = load_tokenizer(model_path)
    pairs, chat = warm_start_pairs(cfg, tokenizer)
    samples = make_samples(tokenizer, pairs, chat)
    # a demonstration's turns weigh alike (sequence mean): a one-token answer is not drowned by a long call
    turns = bool(cfg.task) and bool(make_task(cfg.task, cfg.task_params).env)
    sft = TrainerConfig(
        loss=LossConfig(policy_loss="reinforce", aggregation="seq_mean_token_mean" if turns else "token_mean"),
        optim=OptimConfig(lr=cfg.warm_start.lr, warmup_steps=0),
        parallel=cfg.trainer.parallel,
        max_tokens_per_microbatch=cfg.trainer.max_tokens_per_microbatch,
    )
    trainer = Trainer(model_path, sft, mesh=mesh)
    rng = random.Random(cfg.seed)
    batch = cfg.warm_start.batch_size
    for step in range(cfg.warm_start.steps):
        chosen = rng.sample(samples, min(batch, len(samples)))
        metrics = trainer.train_step(chosen[trainer.rank :: trainer.world])
        if step % 50 == 0 or step == cfg.warm_start.steps - 1:
            log(f"warm start: step {step + 1}/{cfg.warm_start.steps} loss {metrics['loss']:.4f}")
    write_hf(trainer, model_path, out, tokenizer)
    del trainer
    return out
