"""The root config of an RL run (`leagues train`), composed of every component's own config.

Where it sits: `leagues train --recipe NAME --key.sub value` resolves one `TrainConfig`; the loop hands each
component only its own part (`rollout`, `reward`, `trainer`, ...). The run directory receives the resolved
config as `config.yaml`, which `--config` loads back.

Decisions:
- A run names either a built-in `task` (which brings its data, its held-out split and its reward) or a
  `data` file plus a `reward`. With a task, `reward` defaults to the task's own.
- One owner per knob: a setting two components use lives once, with the component that decides it (the
  sampling temperature with the rollout, MoE routing replay with the trainer, deterministic mode at the top
  for engine and trainer alike); `resolve(cfg)` derives the rest (schedule length, Dr.GRPO's budget, route
  recording) after every override and before `config.yaml` is written, and refuses contradictions.
- The SFT warm start (`warm_start`) is part of the run, so `make run` is one command: it trains on the task's
  reference answers (or the data file's `response` column), writes an HF checkpoint into the run directory,
  and the RL phase starts from it; a resumed run finds it there and skips it.
"""

import copy
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from leagues.agent.multi_turn import AgentConfig
from leagues.engine import EngineConfig
from leagues.obs import ObsConfig
from leagues.rollout import DataConfig, RewardConfig
from leagues.rollout.generate import RolloutConfig
from leagues.serve.fleet import FleetConfig
from leagues.train import CriticConfig, DistillConfig, LossConfig, OptimConfig, TrainerConfig
from leagues.train.advantages import AdvantageConfig


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
class CheckpointConfig:
    every: int = 0
    """Checkpoint every this many steps (and at the end); 0: only at the end."""
    keep_last: int = 2
    """Checkpoints kept: older ones are deleted as new ones are written; 0: all."""
    enabled: bool = True
    """Write checkpoints; off for throughput runs whose trainer state would not fit the disk (about 12 bytes
    a parameter: 370 GB for a 30B model)."""
    resume: bool = False
    """Continue from the latest checkpoint in `run_dir`."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"checkpoint.every: must be >= 0 (0: only at the end), got {self.every}")
        if self.keep_last < 0:
            raise ValueError(f"checkpoint.keep_last: must be >= 0 (0: all), got {self.keep_last}")


@dataclass(kw_only=True, slots=True)
class WeightSyncConfig:
    transport: Literal["auto", "disk", "distributed", "none"] = "auto"
    """External engines (`engine_urls`): disk (update_weights_from_disk, shared filesystem), distributed (SGLang's
    NCCL/gloo weight-update group: NCCL on GPUs, gloo on CPUs) or none (frozen engines); auto: disk. In-process
    engines are updated in place (colocated) or by broadcast (disaggregated) whatever this says."""
    address: str = "127.0.0.1"
    """distributed: the address the engines reach this trainer's rank 0 at (the group's TCP store)."""
    port: int = 29650
    """distributed: the TCP store's port."""


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
    critic: CriticConfig = field(default_factory=CriticConfig)
    """PPO's value model, trained beside the policy when `advantage.estimator` is gae (unused otherwise)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """On-policy distillation: a frozen teacher whose per-token reverse KL to the policy's samples is added to the
    advantages (alone with `advantage.estimator distill`)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    deterministic: bool = False
    """True on-policy: engine and trainer run batch-invariant kernels, so rollout logprobs equal the trainer's
    bit for bit (mismatch exactly 0). Sets `engine.deterministic` (which may not say otherwise)."""
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    obs: ObsConfig = field(default_factory=ObsConfig)
    steps: int = 10
    """RL steps (one rollout batch each; `trainer.num_minibatches` x `trainer.epochs` optimizer updates each)."""
    seed: int = 0
    run_dir: str = ""
    """Where metrics, checkpoints, the resolved config and the report go; empty: runs/<time>."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """colocated (every rank trains and rolls out) or disaggregated (engine ranks keep generating)."""
    num_engine_ranks: int = 1
    """Disaggregated: ranks that only generate (the last ones); the others train together (FSDP2 over them alone,
    with `trainer.parallel.ep` dividing their number). The job's size (`nproc` x `nnodes`) sets the rest."""
    max_staleness: int = 1
    """Disaggregated: a batch may be generated with weights at most this many steps old."""
    engine_urls: list[str] = field(default_factory=list)
    """External engines (leagues serve, a router, SGLang) to roll out over HTTP instead of an in-process engine,
    as a fleet (`fleet`): requests go to healthy engines and are retried on another when one fails, weight
    updates skip quarantined engines, and a restarted engine rejoins only once it has the current weights."""
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """External engines (`engine_urls`): health checks, quarantine, retries, balancing (`leagues.serve.fleet`)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    engine_sleep: bool | Literal["auto"] = "auto"
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
    nnodes: int = 1
    """Nodes of the job (torchrun's static rendezvous): run the same command on each, with its own node_rank."""
    node_rank: int = 0
    """This node's place, 0..nnodes-1 (ranks are numbered node by node)."""
    rdzv_endpoint: str = ""
    """HOST:PORT of node 0 that every node reaches (needed with nnodes > 1)."""
    auto_resume: int = 0
    """Restart a failed job (a crash, a killed process) from its last checkpoint, at most this many times; bad
    input (exit status 2) is not retried. 0: off. Checkpoint often (`checkpoint.every`) to lose little."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps: must be >= 0, got {self.steps}")
        if self.num_engine_ranks < 1:
            raise ValueError(f"num_engine_ranks: must be >= 1, got {self.num_engine_ranks}")
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness: must be >= 0, got {self.max_staleness}")
        if self.engine_ep and (self.placement != "colocated" or self.engine_urls):
            raise ValueError("engine_ep: expert-parallel engines are built by colocated runs (no engine_urls)")
        if self.engine_ep and self.engine_offload_weights:
            raise ValueError("engine_offload_weights: expert-parallel engines keep their weights (peers use them)")
        if self.engine_offload_weights and self.engine_sleep is False:
            raise ValueError("engine_offload_weights: the weights move out only while the engine sleeps (engine_sleep)")
        if self.rollout.partial and self.deterministic:
            raise ValueError(
                "rollout.partial: not with --deterministic (where a request is aborted depends on timing, so the run "
                "would not repeat bit for bit)"
            )
        if not self.advantage.needs_critic and self.critic != CriticConfig():
            raise ValueError(
                f"critic: set, but advantage.estimator {self.advantage.estimator} trains no critic (gae does)"
            )
        if not self.distill.enabled and self.distill != DistillConfig():
            raise ValueError("distill: set, but distill.teacher is empty (no teacher to distill from)")
        if self.advantage.estimator == "distill" and not self.distill.enabled:
            raise ValueError("advantage.estimator distill: needs distill.teacher (the model to distill from)")
        if self.advantage.kl_in_reward and self.trainer.loss.kl_coef <= 0:
            raise ValueError("advantage.kl_in_reward: needs trainer.loss.kl_coef > 0 (the penalty's weight)")
        if (self.env or self.agent.run) and self.rollout.partial:
            raise ValueError("rollout.partial: not with an env or agent (a continued sample is a single-turn request)")
        if self.rollout.partial and self.placement != "colocated":
            raise ValueError("rollout.partial: colocated runs only (disaggregated runs bound staleness their own way)")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config that runs: a copy of `cfg` with the values other knobs decide filled in, applied after every
    override and before `config.yaml` is written (so the file says what ran). `cfg` is left as it was; resolving
    a resolved config changes nothing. A contradiction raises `ValueError` naming both keys.

    - `trainer.optim.total_steps` 0: steps x `trainer.num_minibatches` x `trainer.epochs` (the schedule counts
      optimizer updates), the policy's steps after `critic.warmup_steps` (with gae); `critic.optim.total_steps`
      0: the same for every step.
    - `trainer.loss.max_response_tokens` unset: `rollout.max_response_len` (Dr.GRPO's budget).
    - `trainer.moe.routing_replay rollout`: the rollout records the routes it replays (`rollout.return_routes`).
    - `deterministic`: the engine's too (`engine.deterministic` set alone would leave the trainer out).
    """
    out = copy.deepcopy(cfg)
    trainer = out.trainer
    if out.engine.deterministic and not out.deterministic:
        raise ValueError(
            "engine.deterministic: deterministic mode of an RL run is --deterministic (engine and trainer)"
        )
    out.engine.deterministic = out.deterministic
    per_step = trainer.num_minibatches * trainer.epochs
    warmup = out.critic.warmup_steps if out.advantage.needs_critic else 0
    if trainer.optim.total_steps == 0:  # replace: the schedule's own checks see the derived length
        trainer.optim = replace(trainer.optim, total_steps=max(out.steps - warmup, 1) * per_step)
    if out.advantage.needs_critic and out.critic.optim.total_steps == 0:
        out.critic.optim = replace(out.critic.optim, total_steps=max(out.steps, 1) * per_step)
    if trainer.loss.max_response_tokens is None:
        trainer.loss.max_response_tokens = out.rollout.max_response_len
    if trainer.moe.routing_replay == "rollout":
        out.rollout.return_routes = True
    return out
