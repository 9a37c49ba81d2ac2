"""How a colocated run shares each GPU between the trainer and the engine's KV cache, decided before step 1.

    budget = memory_budget(cfg, model_path, longest_prompt, world, free=..., total=..., allocated=...)
    plan = plan_engine_memory(setting, budget)      # EnginePlan(sleep, kv_bytes, note)

Where it sits: `Run.build` measures the device once the trainer is loaded, before the engine is built
(`memory_budget` turns the numbers into a `MemoryBudget`), and builds the engine's cache to the plan;
`colocated_step` sleeps the engine only when `plan.sleep`.

Decisions:
- The trainer's needs are planned, not discovered by an out-of-memory error: its resident state not yet
  allocated when the engine is built, plus one micro-batch's activations (`activation_bytes`), plus a margin.
  The state counts every model the trainer holds (`trainer_state`): the policy (`trainer_memory`: master
  weights, gradients, optimizer moments, gathered weights); PPO's critic, a second trained model of its own
  shape; and the frozen models (`frozen_memory`), the KL reference (`trainer.loss.kl_coef` > 0) and the
  distillation teacher (`distill.teacher`). A sharded frozen model keeps its shard on the device; one alone
  and offloaded (`trainer.ref_offload`) waits on the CPU but is whole on the device while it scores.
- A frozen model scores between steps, when the policy's gradients are freed (they are dropped after every
  update): what its pass gathers (or, offloaded, its whole weights) counts only beyond those gradients.
- A cache beside the trainer (no sleep) must hold the rollout's sequences at once (`need`); with
  `engine_sleep` "auto" the engine then never sleeps, else it sleeps and its cache takes `kv_cache_fraction`
  of the free memory (its pages are released while the trainer trains). `engine_sleep` false keeps the cache
  beside the trainer if at least one sequence of the longest length fits, and otherwise stops the run before
  its first step, naming the numbers and the settings that change them.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch

from leagues.engine.config import kv_block_bytes, max_useful_blocks, resolve_device_dtype
from leagues.loop.config import TrainConfig
from leagues.model import Transformer, read_config, resolve_model_path
from leagues.model.moe import GroupedExperts
from leagues.parallel import activation_bytes, frozen_memory, trainer_memory
from leagues.train.critic import ValueModel

GB = 1e9
MARGIN_BYTES, MARGIN_SHARE = 2 * 2**30, 0.03
"""Device memory a colocated run keeps free: 2 GiB and 3% of the card (graphs' buffers, workspaces)."""


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes on one GPU, measured after the trainer and the engine's weights are loaded."""

    free: int
    """Free device memory now (with what the allocator holds unused)."""
    trainer_pending: int
    """Trainer state still to be allocated (optimizer moments, gradients, gathered weights)."""
    activations: int
    """One training micro-batch's activations and logits (estimated)."""
    margin: int
    """Kept free: CUDA graphs' buffers, kernels' workspaces, fragmentation."""
    need: int
    """Cache bytes for every sequence of a rollout at once (prompt and response at their longest)."""
    minimum: int
    """Cache bytes for one sequence of the engine's longest length."""
    cap: int
    """Cache bytes the engine could ever use at once (`max_useful_blocks`)."""
    fraction: float
    """`engine.kv_cache_fraction`: the share of free memory a sleeping engine's cache takes."""
    parts: dict[str, int] = field(default_factory=dict)
    """The trainer's planned state per rank by part (`trainer_state`), named in the plan's note."""

    @property
    def beside(self) -> int:
        """Cache bytes that fit beside a training step."""
        return self.free - self.trainer_pending - self.activations - self.margin


@dataclass(frozen=True)
class EnginePlan:
    sleep: bool
    kv_bytes: int
    note: str


def plan_engine_memory(setting: bool | str, budget: MemoryBudget) -> EnginePlan:
    """The engine's cache size and whether it sleeps while the trainer trains, for `engine_sleep` = `setting`
    (True, False or "auto"); raises ValueError when `setting` is False and nothing useful fits."""
    b = budget
    parts = " + ".join(f"{name} {size / GB:.1f}" for name, size in b.parts.items())
    numbers = (
        f"{b.free / GB:.1f} GB free, the trainer needs {b.trainer_pending / GB:.1f} GB more for its state "
        + (f"({parts} GB planned, less what is allocated already) " if parts else "")
        + "and "
        f"{b.activations / GB:.1f} GB for a micro-batch, {b.margin / GB:.1f} GB kept free: "
        f"{max(b.beside, 0) / GB:.1f} GB for the KV cache beside training, the rollout needs {b.need / GB:.1f} GB"
    )
    fits = b.beside >= b.need if setting == "auto" else b.beside >= b.minimum
    if setting is not True and fits:
        kv = min(b.beside, b.cap)
        return EnginePlan(False, kv, f"engine keeps a {kv / GB:.2f} GB KV cache through training ({numbers})")
    if setting is False:
        raise ValueError(
            f"engine_sleep false: the KV cache and the trainer do not fit together ({numbers}; one sequence of "
            f"engine.max_model_len needs {b.minimum / GB:.2f} GB). Set engine_sleep to auto or true, or lower "
            "trainer.max_tokens_per_microbatch, engine.max_model_len or engine.max_num_seqs, or set "
            "trainer.parallel.activation_checkpointing, trainer.parallel.cpu_offload, or use more GPUs"
        )
    kv = min(int(b.free * b.fraction), b.free - b.trainer_pending - b.margin, b.cap)
    if kv < b.minimum:
        raise ValueError(
            f"the engine's KV cache cannot hold one sequence even while the trainer's activations are freed "
            f"({numbers}; one sequence of engine.max_model_len needs {b.minimum / GB:.2f} GB). Lower "
            "engine.max_model_len, set trainer.parallel.cpu_offload, or use more GPUs"
        )
    why = "by engine_sleep true" if setting is True else "because the cache and training do not fit together"
    return EnginePlan(True, kv, f"engine sleeps while the trainer trains, {why}; KV cache {kv / GB:.2f} GB ({numbers})")


def trainer_state(cfg: TrainConfig, model_path: Path, world: int, grouped: bool = True) -> dict[str, int]:
    """Device bytes per rank that the trainer of `model_path` holds on a GPU at its peak, by part: "policy"
    (`trainer_memory`'s device total), and when the run has them "critic" (its value model, trained like the
    policy), "reference" and "teacher" (what a frozen model keeps on the device between uses) and "scoring" (what
    the largest frozen model's pass adds beyond the policy's gradients, freed by then; left out when nothing).
    `grouped`: the trainer has a process group (every GPU run launched by `leagues train`), so frozen models are
    sharded like the policy; without one they are whole float32 models."""
    parallel, config = cfg.trainer.parallel, read_config(model_path)
    compute = parallel.resolved_param_dtype("cuda").itemsize
    policy = trainer_memory(config, parallel, world, compute)
    parts = {"policy": policy["device"]}
    if cfg.advantage.needs_critic:
        with torch.device("meta"):
            critic = ValueModel(read_config(resolve_model_path(cfg.critic.model)) if cfg.critic.model else config)
        parts["critic"] = trainer_memory(critic, parallel, world, compute)["device"]
    frozen = {"reference": config} if cfg.trainer.loss.kl_coef > 0 else {}
    if cfg.distill.enabled:
        frozen["teacher"] = read_config(resolve_model_path(cfg.distill.teacher))
    offload = not grouped and cfg.trainer.ref_offload
    scoring = 0
    for name, frozen_config in frozen.items():
        plan = frozen_memory(frozen_config, parallel, world, compute, grouped=grouped, offload=offload)
        parts[name], scoring = plan["resident"], max(scoring, plan["scoring"])
    grads = 0 if parallel.cpu_offload and parallel.grad_accumulation == "sharded" else policy["grads"]
    if scoring > grads:
        parts["scoring"] = scoring - grads
    return parts


def memory_budget(
    cfg: TrainConfig,
    model_path: Path,
    longest_prompt: int,
    world: int,
    *,
    free: int,
    total: int,
    allocated: int,
    grouped: bool = True,
) -> MemoryBudget:
    """The budget of one GPU of `total` bytes for the engine of `model_path`, measured once the trainer is built:
    `free` bytes free (with what the allocator holds unused), `allocated` held by tensors (the trainer's weights,
    its frozen models' shards). The engine's weights are yet to load; `longest_prompt`: the training data's."""
    config, engine = read_config(model_path), cfg.engine
    itemsize = resolve_device_dtype(engine)[1].itemsize
    block = kv_block_bytes(config, engine, itemsize)
    with torch.device("meta"):
        shapes = Transformer(config)
    experts = sum(p.numel() for m in shapes.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
    weights = sum(p.numel() for p in shapes.parameters()) - experts + experts // (world if cfg.engine_ep else 1)
    parts = trainer_state(cfg, model_path, world, grouped)
    max_len = engine.max_model_len or config.max_seq_len
    sequence = -(-(longest_prompt + cfg.rollout.max_response_len) // engine.block_size)
    samples = min(-(-cfg.rollout.batch_size // world) * cfg.rollout.n_samples_per_prompt, engine.max_num_seqs)
    given = engine.num_blocks * block if engine.num_blocks is not None else None
    tokens, parallel = cfg.trainer.max_tokens_per_microbatch, cfg.trainer.parallel
    return MemoryBudget(
        free=free - weights * itemsize,
        trainer_pending=max(sum(parts.values()) - allocated, 0),
        activations=activation_bytes(config, tokens, parallel, cfg.trainer.logprob_chunk_size),
        margin=int(MARGIN_BYTES + MARGIN_SHARE * total),
        need=given or samples * sequence * block,
        minimum=given or -(-max_len // engine.block_size) * block,
        cap=given or max_useful_blocks(config, engine) * block,
        fraction=engine.kv_cache_fraction,
        parts=parts,
    )
