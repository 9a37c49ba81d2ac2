"""The root config of an RL run (`leagues train`), composed of every component's own config.

Where it sits: `leagues train --recipe NAME --key.sub value` resolves one `TrainConfig`; the loop hands each
component only its own part (`rollout`, `reward`, `trainer`, ...). The run directory receives the resolved
config as `config.yaml`, which `--config` loads back.

Decisions:
- A run names either a built-in `task` (which brings its data, its held-out split and its reward) or a
  `data` file plus a `reward`. With a task, `reward` defaults to the task's own.
- The SFT warm start (`warm_start`) is part of the run, so `make run` is one command: it trains on the task's
  reference answers (or the data file's `response` column), writes an HF checkpoint into the run directory,
  and the RL phase starts from it; a resumed run finds it there and skips it.
"""

from dataclasses import dataclass, field
from typing import Any

from leagues.agent.multi_turn import AgentConfig
from leagues.engine import EngineConfig
from leagues.obs import ObsConfig
from leagues.rollout import DataConfig, RewardConfig
from leagues.rollout.generate import RolloutConfig
from leagues.train import LossConfig, OptimConfig, TrainerConfig
from leagues.train.advantages import AdvantageConfig
from leagues.train.moe import MoEConfig

PLACEMENTS = ("colocated", "disaggregated")


@dataclass(kw_only=True, slots=True)
class WarmStartConfig:
    steps: int = 0
    """SFT optimizer steps before RL (0: none)."""
    batch_size: int = 64
    """Samples per SFT step."""
    lr: float = 3e-3
    num_rows: int = 4096
    """Reference rows drawn from the task's train split (tasks only)."""
    response_key: str = "response"
    """Column of the reference response when the run trains on a data file."""


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    every: int = 0
    """Evaluate held-out accuracy every this many steps (and before the first and after the last); 0: never."""
    num_prompts: int = 256
    """Held-out prompts (the task's test split, or the first rows of `data`)."""
    data: str = ""
    """A JSONL/Parquet file of held-out prompts (same keys as the training data); empty: the task's test split."""
    max_response_len: int | None = None
    """None: the rollout's."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    model: str = "tiny-moe"
    """Checkpoint directory or built-in model name."""
    task: str = ""
    """A built-in task (arithmetic, countdown): brings data, held-out split and reward. Empty: use `data`."""
    task_params: dict[str, Any] = field(default_factory=dict)
    """Settings of the task's own config (e.g. {max_digits: 2})."""
    task_rows: int = 8000
    """Training prompts drawn from the task."""
    data: DataConfig = field(default_factory=DataConfig)
    env: str = ""
    """'module:Factory' of a multi-turn environment (`leagues.agent.Env`), made once per sample and run by the
    built-in multi-turn generate function (limits in `agent`); empty: the task's env (lookup), else single turn."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Multi-turn: the user's agent (`--agent module:run`, through sessions), and the limits of env episodes
    (turns, total tokens, tool time and parallelism, tool-call parser)."""
    reward: RewardConfig | None = None
    """The reward; None: the task's, or with an env the env's own (`env`) (a data file without an env needs one)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    trainer: TrainerConfig = field(
        default_factory=lambda: TrainerConfig(loss=LossConfig(eps_clip_high=0.28), optim=OptimConfig(lr=1e-6))
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    """MoE stability: rollout routing replay (`--moe.routing_replay rollout`), load balancing."""
    deterministic: bool = False
    """True on-policy: engine and trainer run batch-invariant kernels, so rollout logprobs equal the trainer's
    bit for bit (mismatch exactly 0). CPU reference kernels for now: for small models."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)
    steps: int = 10
    """RL steps (one rollout batch each; `trainer.num_minibatches` x `trainer.epochs` optimizer updates each)."""
    seed: int = 0
    run_dir: str = ""
    """Where metrics, checkpoints, the resolved config and the report go; empty: runs/<time>."""
    save_every: int = 0
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept (the trainer's `keep_last` follows it)."""
    checkpoints: bool = True
    """Write checkpoints; off for throughput runs whose trainer state would not fit the disk (about 12 bytes
    a parameter: 370 GB for a 30B model)."""
    resume: bool = False
    """Continue from the latest checkpoint in `run_dir`."""
    placement: str = "colocated"
    """colocated (every rank trains and rolls out) or disaggregated (engine ranks keep generating)."""
    num_engine_ranks: int = 1
    """Ranks that only generate, when disaggregated (the last ones)."""
    max_staleness: int = 1
    """Disaggregated: a batch may be generated with weights at most this many steps old."""
    engine_urls: list[str] = field(default_factory=list)
    """External engines (leagues serve, a router, SGLang) to roll out over HTTP instead of an in-process engine."""
    weight_sync: str = "auto"
    """External engines: disk (update_weights_from_disk, shared filesystem), distributed (SGLang's NCCL/gloo
    weight-update group: NCCL on GPUs, gloo on CPUs) or none (frozen engines); auto: disk."""
    weight_sync_address: str = "127.0.0.1"
    """distributed: the address the engines reach this trainer's rank 0 at (the group's TCP store)."""
    weight_sync_port: int = 29650
    """distributed: the TCP store's port."""
    engine_sleep: bool | str = "auto"
    """Colocated on GPUs: release the engine's KV cache while the trainer trains (true), keep it (false: the run
    stops before its first step when the cache and training cannot fit together, naming the numbers), or
    auto: keep it when a cache for the whole rollout fits beside training, else sleep. The cache's pages are
    released and mapped back at the same addresses, so its CUDA graphs stay valid (`leagues.loop.memory`)."""
    engine_offload_weights: bool = False
    """With engine_sleep: also move the engine's weights to host memory while the trainer trains (room for a
    larger model or batch, at the cost of a host round trip of the weights every step)."""
    engine_ep: bool = False
    """Colocated: the engines of all ranks split every MoE layer's experts between them (expert parallel) and
    step in lockstep, so each holds 1/world of the experts: room for a model too large for one engine per GPU."""
    nproc: int = 1
    """Ranks to start on this node (torchrun underneath)."""
    report: bool = True
    """Write the PNG plots and summary (`leagues report`) at the end of the run."""

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.save_every < 0:
            raise ValueError(f"save_every: must be >= 0 (0: only at the end), got {self.save_every}")
        if self.steps < 0:
            raise ValueError(f"steps: must be >= 0, got {self.steps}")
        if self.weight_sync not in ("auto", "disk", "distributed", "none"):
            raise ValueError(f"weight_sync: expected auto, disk, distributed or none, got {self.weight_sync!r}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {self.max_staleness}")
        if self.engine_ep and (self.placement != "colocated" or self.engine_urls):
            raise ValueError("engine_ep: expert-parallel engines are built by colocated runs (no engine_urls)")
        if self.engine_ep and self.engine_offload_weights:
            raise ValueError("engine_offload_weights: expert-parallel engines keep their weights (peers use them)")
        if self.placement == "disaggregated" and self.eval.every:
            raise ValueError("eval.every: held-out evaluation runs in colocated runs only (placement colocated)")
        if self.engine_sleep not in (True, False, "auto"):
            raise ValueError(f"engine_sleep: expected true, false or auto, got {self.engine_sleep!r}")
        if self.engine_offload_weights and self.engine_sleep is False:
            raise ValueError("engine_offload_weights: the weights move out only while the engine sleeps (engine_sleep)")
        if self.rollout.partial and self.deterministic:
            raise ValueError(
                "rollout.partial: not with --deterministic (where a request is aborted depends on timing, so the run "
                "would not repeat bit for bit)"
            )
        if (self.env or self.agent.run) and self.rollout.partial:
            raise ValueError("rollout.partial: not with an env or agent (a continued sample is a single-turn request)")
        if self.rollout.partial and self.placement != "colocated":
            raise ValueError("rollout.partial: colocated runs only (disaggregated runs bound staleness their own way)")

    def settle(self) -> None:
        """Hand the settings this run owns to the components that use them, so each knob has one owner: the
        trainer's temperature is the rollout's, its MoE settings the top-level `moe`, its `keep_last` the
        top-level one, deterministic mode the top-level flag for engine and trainer alike; unless given, the
        schedule's `total_steps` is steps x updates per step and Dr.GRPO's budget `rollout.max_response_len`.
        A component value set to something else is refused, naming both keys; settling twice (a written
        config.yaml loaded back) changes nothing."""
        trainer, defaults = self.trainer, TrainerConfig()
        for name, owner, value, default in (
            ("trainer.temperature", "rollout.temperature", self.rollout.temperature, defaults.temperature),
            ("trainer.moe", "moe", self.moe, defaults.moe),
            ("trainer.keep_last", "keep_last", self.keep_last, defaults.keep_last),
        ):
            current = getattr(trainer, name.split(".")[1])
            if current not in (value, default):
                raise ValueError(f"{name}: set by {owner} in an RL run ({current!r} against {value!r}); set --{owner}")
        trainer.temperature, trainer.moe, trainer.keep_last = self.rollout.temperature, self.moe, self.keep_last
        if (self.engine.deterministic or trainer.deterministic) and not self.deterministic:
            raise ValueError("engine.deterministic / trainer.deterministic: set --deterministic, which sets both")
        self.engine.deterministic = trainer.deterministic = self.deterministic
        if trainer.optim.total_steps == 0:  # the schedule counts optimizer updates
            trainer.optim.total_steps = max(self.steps, 1) * trainer.num_minibatches * trainer.epochs
        if trainer.loss.max_response_tokens is None:  # Dr.GRPO's divisor: the generation budget
            trainer.loss.max_response_tokens = self.rollout.max_response_len
        if self.moe.routing_replay == "rollout":  # the engine records what the trainer replays
            self.rollout.return_routes = True
