"""How a colocated run shares each GPU between the trainer and the engine's KV cache, decided before step 1.

    plan = plan_engine_memory(setting, budget)      # EnginePlan(sleep, kv_bytes, note)

Where it sits: `Run.build` measures the device once the trainer and the engine's weights are loaded
(`MemoryBudget`) and builds the engine's cache to the plan; `colocated_step` sleeps the engine only when
`plan.sleep`.

Decisions:
- The trainer's needs are planned, not discovered by an out-of-memory error: its resident state
  (`trainer_memory`: master weights, gradients, optimizer moments, gathered weights) not yet allocated when
  the engine is built, plus one micro-batch's activations (`activation_bytes`), plus a margin.
- A cache beside the trainer (no sleep) must hold the rollout's sequences at once (`need`); with
  `engine_sleep` "auto" the engine then never sleeps, else it sleeps and its cache takes `kv_cache_fraction`
  of the free memory (its pages are released while the trainer trains). `engine_sleep` false keeps the cache
  beside the trainer if at least one sequence of the longest length fits, and otherwise stops the run before
  its first step, naming the numbers and the settings that change them.
"""

from dataclasses import dataclass

GB = 1e9


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
    numbers = (
        f"{b.free / GB:.1f} GB free, the trainer needs {b.trainer_pending / GB:.1f} GB more for its state and "
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
