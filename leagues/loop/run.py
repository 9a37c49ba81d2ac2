"""Everything an RL run holds, built once: run directory, data, reward, trainer, engine, sinks, resume.

Where it sits: `leagues.loop.train.train(cfg)` builds a `Run` with `Run.build(cfg)` and then only steps.
This file is the wiring; the step itself reads top to bottom in `train.py`.

Decisions:
- Every rank builds the same prompt iterator (same seed) and takes its share of each global batch
  (`prompts[rank::world]`), so the data position is one number for the whole job and resumes exactly.
  (With dynamic sampling on several ranks, ranks draw extra rounds independently and their positions
  drift apart; rank 0's position is the one checkpointed.)
- The trainer computes logprobs at the rollout's temperature (`rollout.temperature` is the one knob of both).
- The engine is built from the same checkpoint the trainer starts from, so step 0 needs no weight sync;
  after a resume the trainer's weights are pushed before the first rollout.
- Disaggregated runs name their trainer ranks (`Run.build(cfg, trainer_ranks)`): every rank builds the trainer
  ranks' mesh first (process groups are made by the whole job), the trainer ranks warm start and train on it, and
  the other ranks build only an engine.
- External engines (`engine_urls`) replace the in-process engine: rollout goes over HTTP through a fleet
  (`leagues.serve.fleet`: healthy engines only, failed requests retried on another), and weights reach them
  after each step, from a checkpoint in the run directory (`update_weights_from_disk`) or over a weight-update
  group (`weight_sync.transport distributed`), on the engines the fleet says should serve (`update_engines`:
  quarantined and dead ones skipped, restarted ones caught up), with the run's key (`fleet.api_key`). The
  transport runs on the main thread, since the distributed one gathers the trainer's weights as it sends.
"""

import asyncio
import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist

from leagues.agent.agents import agent_generate
from leagues.agent.multi_turn import env_generate
from leagues.config import dump_yaml
from leagues.engine import Engine
from leagues.engine.client import EngineClient, LocalClient
from leagues.engine.config import kv_block_bytes, resolve_device_dtype
from leagues.loop.config import TrainConfig, resolve
from leagues.loop.memory import EnginePlan, memory_budget, plan_engine_memory, trainer_state
from leagues.loop.warm_start import warm_start, write_hf
from leagues.model import load_tokenizer, read_config, resolve_model_path
from leagues.obs import Sink, StepTimer, build_sinks
from leagues.parallel import ParallelMesh, build_mesh, format_plan, trainer_memory
from leagues.rollout import PromptDataset, PromptIterator, RewardConfig, RewardScorer, load_prompts, make_task
from leagues.rollout.generate import GenerateContext, load_generate_fn
from leagues.rollout.partial import PartialRollout
from leagues.rollout.tasks import task_dataset
from leagues.serve.fleet import Fleet
from leagues.serve.fleet_client import FleetClient
from leagues.serve.sessions import LoopbackSessions
from leagues.sync import WEIGHT_SYNCS, DistributedWeightSender, WeightSync
from leagues.train import Trainer
from leagues.train.checkpoint import load_latest
from leagues.train.distill import check_teacher
from leagues.types import SamplingParams


def rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log(*args) -> None:
    if rank_world()[0] == 0:
        print(*args, flush=True)


def memory_note(cfg: TrainConfig, model_path: Path, world: int, total: int) -> str:
    """The trainer's planned memory per GPU of `total` bytes, and what to change when it cannot fit (said before
    anything is allocated, rather than as an out-of-memory error minutes later)."""
    plan = trainer_memory(read_config(model_path), cfg.trainer.parallel, world)
    parts = trainer_state(cfg, model_path, world, grouped=dist.is_initialized())
    note = f"trainer memory plan: {format_plan(plan)}"
    beside = {name: size for name, size in parts.items() if name != "policy"}
    if beside:  # the critic, the frozen models
        note += "; beside the policy " + ", ".join(f"{name} {size / 1e9:.1f} GB" for name, size in beside.items())
    if sum(parts.values()) > total:
        note += (
            f". That is more than this GPU's {total / 1e9:.0f} GB: set trainer.parallel.grad_accumulation to "
            "sharded, trainer.parallel.cpu_offload to true, or trainer.parallel.ep higher"
        )
    return note


def generate_fn(cfg: TrainConfig):
    """The run's generate function: multi-turn episodes of the env (`env`, or the task's), the user's agent
    through sessions (`agent.run`), the user's `rollout.generate_fn`, or single turn."""
    env = cfg.env or (make_task(cfg.task, cfg.task_params).env if cfg.task else "")
    chosen = [name for name, value in (("env", env), ("agent", cfg.agent.run), ("rollout.generate_fn",
              cfg.rollout.generate_fn)) if value]  # fmt: skip
    if len(chosen) > 1:
        raise ValueError(f"{chosen[1]}: one way of generating per run, got {' and '.join(chosen)} (env {env!r})")
    if cfg.agent.run:
        return agent_generate(cfg.agent.run, LoopbackSessions())
    return env_generate(env, cfg.agent) if env else load_generate_fn(cfg.rollout.generate_fn)


def resolve_run_dir(cfg: TrainConfig) -> Path:
    """`cfg.run_dir`, or runs/<time> agreed by every rank."""
    name = [cfg.run_dir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))]
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def datasets(
    cfg: TrainConfig, tokenizer, max_len: int | None = None
) -> tuple[PromptDataset, PromptDataset | None, RewardConfig]:
    """Training prompts, held-out prompts (or None) and the reward of the run. `max_len`: the engine's context
    limit; unless `data.max_prompt_tokens` is set, a prompt that leaves no room for `max_response_len` tokens
    is rejected at load naming its file and line (or dropped with `data.filter_long_prompts`)."""
    if cfg.task:
        task = make_task(cfg.task, cfg.task_params)
        train = task_dataset(task, tokenizer, cfg.task_rows, cfg.seed, "train", at_most=True)
        held_out = None
        if cfg.eval.every:
            held_out = task_dataset(task, tokenizer, cfg.eval.num_prompts, cfg.seed, "test", at_most=True)
        return train, held_out, cfg.reward or task.reward
    if not cfg.data.path:
        raise ValueError("data.path: give a prompt file (--data.path FILE) or a built-in task (--task arithmetic)")
    reward = cfg.reward or (RewardConfig(name="env") if cfg.env or cfg.agent.run else None)
    if reward is None:
        raise ValueError("reward.name: a run on a data file needs a reward (--reward.name math, or module:function)")
    data = cfg.data
    if data.max_prompt_tokens is None and max_len is not None:  # room for the response, checked at load
        if max_len <= cfg.rollout.max_response_len:
            raise ValueError(
                f"rollout.max_response_len ({cfg.rollout.max_response_len}) leaves no room for a prompt in the "
                f"engine's context of {max_len} tokens (engine.max_model_len)"
            )
        data = replace(data, max_prompt_tokens=max_len - cfg.rollout.max_response_len)
    held_out = load_prompts(replace(data, path=cfg.eval.data), tokenizer) if cfg.eval.data else None
    return load_prompts(data, tokenizer), held_out, reward


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    model_path: Path
    tokenizer: object
    prompts: PromptIterator
    held_out: PromptDataset | None
    scorer: RewardScorer
    trainer: Trainer | None
    engine: Engine | None
    client: EngineClient
    ctx: GenerateContext
    sinks: Sink
    timer: StepTimer
    loop: asyncio.AbstractEventLoop
    start_step: int = 0
    rank: int = 0
    world: int = 1
    generate_fn: object = None
    peer_group: object = None
    """Expert-parallel engines: a CPU group the ranks wait on until every engine has finished its requests."""
    engine_sleeps: bool = False
    """Colocated on GPUs: the engine frees its KV cache while the trainer trains (`leagues.loop.memory`)."""
    weight_sync: WeightSync | None = None
    """How the trainer's weights reach the engines each step (`leagues.sync.WEIGHT_SYNCS`), chosen at build."""
    trainer_ranks: list[int] = field(default_factory=lambda: [0])
    """The ranks that train: every rank (colocated), or the first ones of a disaggregated job."""
    partial: PartialRollout = field(default_factory=PartialRollout)
    """Partial rollout (`rollout.partial`): this rank's samples carried into the next step, saved with checkpoints."""
    fleet: Fleet | None = None
    """External engines (`engine_urls`): the fleet the rollout client and the weight updates go through."""
    _sender: DistributedWeightSender | None = None

    @classmethod
    def build(cls, cfg: TrainConfig, trainer_ranks: list[int] | None = None) -> "Run":
        """The run's parts, each from its own builder; user input (config, data, reward) is checked before any
        model is built or trained. `trainer_ranks`: these ranks train (on a mesh of their own) and the others
        roll out (disaggregated); None: every rank does both (colocated)."""
        cfg = resolve(cfg)  # settled already by `leagues.loop.train`; resolving again changes nothing
        rank, world = rank_world()
        together = trainer_ranks is None  # colocated: every rank trains and rolls out
        trainer_ranks = list(range(world)) if together else trainer_ranks
        is_trainer, is_engine = rank in trainer_ranks, together or rank not in trainer_ranks
        mesh = None if together else _trainer_mesh(cfg, trainer_ranks)  # every rank of the job builds it
        run_dir = resolve_run_dir(cfg)
        torch.manual_seed(cfg.seed)
        base = resolve_model_path(cfg.model)
        tokenizer = load_tokenizer(base)  # a warm start keeps the base model's tokenizer
        train_data, held_out, reward = datasets(cfg, tokenizer, context_limit(cfg, base))
        scorer = RewardScorer(reward)  # a reward that cannot load fails here, not after the warm start
        generate = generate_fn(cfg)  # so does a generate function, env or agent that cannot load
        if cfg.distill.enabled:  # and a teacher that does not share the student's tokenizer
            check_teacher(cfg.distill.teacher, base)
        _write_run_dir(cfg, run_dir, rank)  # only once the inputs are known to be good
        model_path = _warm_started(cfg, base, run_dir, is_trainer, mesh)
        trainer = _trainer(cfg, model_path, len(trainer_ranks), mesh) if is_trainer else None
        memory_plan = _memory_plan(cfg, model_path, train_data, world) if trainer is not None and is_engine else None
        engine, client = _engine(cfg, model_path, tokenizer, is_engine, memory_plan)
        params = SamplingParams(
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_response_len,
            stop=list(cfg.rollout.stop),
            return_routed_experts=cfg.rollout.return_routes,
        )
        run = cls(
            cfg=cfg,
            run_dir=run_dir,
            model_path=model_path,
            tokenizer=tokenizer,
            prompts=PromptIterator(train_data, seed=cfg.data.seed + cfg.seed, shuffle=cfg.data.shuffle),
            held_out=held_out,
            scorer=scorer,
            trainer=trainer,
            engine=engine,
            client=client,
            fleet=client.fleet if isinstance(client, FleetClient) else None,
            ctx=GenerateContext(client=client, params=params, tokenizer=tokenizer, config=cfg.rollout),
            sinks=None,  # type: ignore[arg-type]
            timer=StepTimer(sync=torch.cuda.synchronize if torch.cuda.is_available() else None),
            loop=asyncio.new_event_loop(),
            rank=rank,
            world=world,
            generate_fn=generate,
            engine_sleeps=engine is not None and memory_plan is not None and memory_plan.sleep,
            trainer_ranks=trainer_ranks,
        )
        if engine is not None and cfg.engine_ep and world > 1:
            run.peer_group = dist.new_group(backend="gloo")
        run.weight_sync = WEIGHT_SYNCS[_sync_name(cfg, engine)].from_run(run)
        run.start_step = run.resume() if cfg.checkpoint.resume else 0
        resume_step = run.start_step if cfg.checkpoint.resume else None
        run.sinks = build_sinks(cfg.obs, run_dir, cfg.steps, resume_step=resume_step, rank=rank)
        return run

    def wait_for_peers(self) -> None:
        """Expert-parallel engines serve each other's tokens until every rank's requests are done: wait for that
        (on a CPU group) before this rank's main thread starts collectives of its own. An engine stopped by a
        failed step raises here instead: its peers wait inside an exchange it will never join, and this rank's
        exit is what lets the launcher stop them."""
        if self.engine is not None and self.engine.failure is not None:
            raise RuntimeError(f"rank {self.rank}: the expert-parallel engine failed a step") from self.engine.failure
        if self.peer_group is not None:
            dist.barrier(group=self.peer_group)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def resume(self) -> int:
        """Load the latest checkpoint that loads (a damaged newest one is skipped with a warning); returns the
        step to continue from."""
        found = load_latest(self.checkpoint_root, self.trainer.load if self.trainer is not None else _read_extra)
        if found is None:
            log(f"resume: no checkpoint under {self.checkpoint_root}, starting at step 0")
            return 0
        path, extra = found
        self.prompts.load_state_dict(extra["data"])
        if self.cfg.rollout.partial and "partial" in extra:  # the samples carried past that step go on
            self.partial.load_state_dict(extra["partial"])
        log(f"resume: continuing from {path} (step {extra['step']})")
        return int(extra["step"])

    def save(self, step: int) -> None:
        extra = {"data": self.prompts.state_dict(), "step": step}
        if self.cfg.rollout.partial:  # each rank its own carried samples (the checkpoint keeps extra per rank)
            extra["partial"] = self.partial.state_dict()
        self.trainer.save(self.checkpoint_root, extra=extra, keep_last=self.cfg.checkpoint.keep_last)

    def weight_sender(self) -> DistributedWeightSender:
        """The SGLang weight-update group to the external engines, made on first use (rank 0 only); its members
        follow the fleet (`update_engines`)."""
        if self._sender is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            address, port = self.cfg.weight_sync.address, self.cfg.weight_sync.port
            self._sender = DistributedWeightSender(list(self.fleet.replicas), address, port, backend=backend)
        return self._sender

    def update_engines(self, send, version: int) -> dict[str, float]:
        """`send(targets)` to the external engines that are to serve `version`, as the fleet says after fresh health
        checks (quarantined and dead ones skipped, restarted ones caught up; each with the run's key), on this
        thread; its failures go back to the fleet. The fleet's metrics."""
        targets = self.loop.run_until_complete(self.fleet.weight_targets())
        return self.fleet.weights_updated(version, targets, send(targets))

    def write_weights(self, trainer) -> Path:
        """The trainer's weights as an HF checkpoint under the run directory (for engines that read the disk)."""
        return write_hf(trainer, self.model_path, self.run_dir / "weights", self.tokenizer)

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        self.sinks.close()
        self.scorer.close()
        if self.engine is not None:
            self.engine.close()
        if self.fleet is not None:
            self.loop.run_until_complete(self.fleet.close())
        if (aclose := getattr(self.generate_fn, "aclose", None)) is not None:  # an agent run's session server
            self.loop.run_until_complete(aclose())
        self.loop.close()


def context_limit(cfg: TrainConfig, model_path: Path) -> int | None:
    """The engine's longest sequence: its `max_model_len`, else the model's position limit."""
    if cfg.engine.max_model_len:
        return cfg.engine.max_model_len
    config = json.loads((model_path / "config.json").read_text())
    return config.get("max_position_embeddings")


def _engine(cfg: TrainConfig, model_path: Path, tokenizer, is_engine: bool, plan: EnginePlan | None = None):
    if cfg.engine_urls:
        return None, FleetClient(Fleet(cfg.engine_urls, cfg.fleet))
    if not is_engine:
        return None, None
    overrides = {}
    if plan is not None:
        config = read_config(model_path)
        itemsize = resolve_device_dtype(cfg.engine)[1].itemsize
        overrides["num_blocks"] = max(plan.kv_bytes // kv_block_bytes(config, cfg.engine, itemsize), 1)
    groups = {}
    if cfg.engine_ep and dist.is_initialized() and dist.get_world_size() > 1:  # every rank builds its engine
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        groups = dict(ep_group=dist.new_group(backend=backend), ep_control_group=dist.new_group(backend="gloo"))
    engine = Engine(model_path, tokenizer, cfg.engine, **groups, **overrides)
    return engine, LocalClient(engine)


def _memory_plan(cfg: TrainConfig, model_path: Path, train_data: PromptDataset, world: int) -> EnginePlan | None:
    """The engine's KV cache and sleep, planned after the trainer is loaded and before the engine is (colocated
    runs with an in-process engine on a GPU; None elsewhere: a CPU engine keeps its cache and never sleeps)."""
    if cfg.engine_urls or cfg.placement != "colocated" or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # held by torch, unused
    longest = max(len(p.prompt_ids) for p in train_data)
    measured = dict(free=free, total=total, allocated=torch.cuda.memory_allocated(), grouped=dist.is_initialized())
    budget = memory_budget(cfg, model_path, longest, world, **measured)
    plan = plan_engine_memory(True if cfg.engine_offload_weights else cfg.engine_sleep, budget)
    log(plan.note)
    return plan


def _write_run_dir(cfg: TrainConfig, run_dir: Path, rank: int) -> None:
    """The run directory, with the resolved config (`leagues.loop.config.resolve`, what runs) written to it, less
    the engines' API key (a secret: a rerun gives it again, or through $LEAGUES_API_KEY)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        dump_yaml(replace(cfg, fleet=replace(cfg.fleet, api_key="")), run_dir / "config.yaml")


def _trainer_mesh(cfg: TrainConfig, trainer_ranks: list[int]) -> ParallelMesh | None:
    """The trainer ranks' own mesh, when they are some of the job's ranks: built by every rank of the job (it
    makes process groups), None on the others."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return build_mesh(cfg.trainer.parallel, len(trainer_ranks), device_type, ranks=trainer_ranks)


def _warm_started(cfg: TrainConfig, base: Path, run_dir: Path, is_trainer: bool, mesh: ParallelMesh | None) -> Path:
    """The model the RL steps start from: `base`, or the SFT warm start of it (made by the trainer ranks, on
    `mesh` when they are some of the job's ranks)."""
    if not cfg.warm_start.steps:
        return base
    if is_trainer:
        warm_start(cfg, base, run_dir, log=log, mesh=mesh)
    if cfg.placement == "disaggregated":
        dist.barrier()  # engine ranks wait for the trainers' warm start
    return run_dir / "warm_start"


def _trainer(cfg: TrainConfig, model_path: Path, num_trainers: int, mesh: ParallelMesh | None) -> Trainer:
    if torch.cuda.is_available():
        log(memory_note(cfg, model_path, num_trainers, torch.cuda.get_device_properties(0).total_memory))
    return Trainer(
        model_path,
        cfg.trainer,
        mesh=mesh,
        kl_in_reward=cfg.advantage.kl_in_reward,
        temperature=cfg.rollout.temperature,
        deterministic=cfg.deterministic,
        critic=cfg.critic if cfg.advantage.needs_critic else None,
        teacher=cfg.distill.teacher or None,
    )


def _sync_name(cfg: TrainConfig, engine) -> str:
    """The weight transport: broadcast inside a disaggregated job, in place to this rank's engine, else
    `weight_sync.transport` to the external engines."""
    if cfg.placement == "disaggregated":
        return "broadcast"
    if engine is not None:
        return "in_place"
    transport = cfg.weight_sync.transport
    return "disk" if transport == "auto" else transport


def _read_extra(path: Path) -> dict:
    """The caller-provided state of a checkpoint, for ranks without a trainer (engine ranks)."""
    from leagues.train.checkpoint import read_extra

    return read_extra(path)
