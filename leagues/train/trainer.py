"""The trainer: one optimizer step on a global batch of samples, on one process or many (FSDP2 + EP).

    trainer = Trainer("tiny-moe", TrainerConfig(), temperature=1.0)  # the rollout's sampling temperature
    trainer.compute_logprobs(samples)        # per-sample response logprobs (no grad)
    metrics = trainer.train_step(samples)    # this rank's samples; rebalanced across ranks by tokens
    penalties = trainer.kl_rewards(samples)  # KL to the reference as reward shaping (kl_in_reward)
    values = trainer.compute_values(samples) # PPO's critic (critic=CriticConfig()): per-token values, for GAE
    teacher = trainer.teacher_logprobs(samples)  # on-policy distillation (teacher=PATH): the teacher's logprobs
    for bucket in trainer.state_dict_for_sync(): engine.load_weights(bucket)
    trainer.save(dir, extra={"data": ...}, keep_last=3); trainer.load(dir)

A step: gather every rank's samples and split them evenly by token count; pack each rank's share
into micro-batches of at most `max_tokens_per_microbatch` tokens; compute one `Normalizer` over the
whole global batch (so the loss does not depend on how it is split); forward, loss, backward per
micro-batch; then one clipped, guarded optimizer step.

Mini-batch updates (`num_minibatches`, `epochs`): each rank cuts its share into `num_minibatches` parts and
every part is one update (its own global `Normalizer`, every rank taking part), `epochs` times over. The
ratio's old policy is then fixed before the first update: one no-grad forward of the policy
(`old_logprobs="recompute"`) or the engine's logprobs ("rollout"), so from the second update on the PPO clip
acts. With a single update the recomputed old logprobs are the forward's own, detached (the same values,
no second forward), and the ratio is 1.

PPO with a critic (`critic=CriticConfig()`, `leagues.train.critic`): a value model sharded like the policy, whose
passes follow the policy's over the same micro-batches in every update, each model then stepping its own
optimizer; saved and loaded in the same checkpoint. During `critic.warmup_steps` only the critic trains.

On-policy distillation (`teacher=PATH`, `leagues.train.distill`): a frozen teacher built and sharded like the
reference, which scores the sampled tokens once per rollout batch with its own routes (never the replayed ones).
"""

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from leagues.model import ForwardBatch, Transformer, load_pretrained, resolve_model_path
from leagues.model.checkpoint import read_config, read_parameters, reset_buffers
from leagues.parallel import (
    ParallelConfig,
    ParallelMesh,
    compute_copies,
    compute_weights,
    full_state_dict,
    load_full_tensors,
    parallelize,
    refresh,
    set_last_microbatch,
    unit_buckets,
    whole_parameters,
)
from leagues.train.checkpoint import Part, load_checkpoint, on_group, save_checkpoint
from leagues.train.critic import Critic, CriticConfig, ValueModel, explained_variance, value_model
from leagues.train.frozen import frozen_model, on_device
from leagues.train.logprobs import token_logprobs
from leagues.train.losses import LossConfig, LossInputs, Normalizer, kl_penalty_rewards, policy_loss
from leagues.train.metrics import accumulate, merge_updates, reduce_over_ranks
from leagues.train.moe import (
    MoEConfig,
    load_metrics,
    moe_terms,
    update_expert_bias,
)
from leagues.train.optim import OptimConfig, build_optimizer, build_scheduler, optimizer_step
from leagues.train.packing import (
    MicroBatch,
    balance,
    build_microbatch,
    input_length,
    response_mask,
    split_by_tokens,
)
from leagues.types import Sample


@dataclass(kw_only=True, slots=True)
class TrainerConfig:
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_tokens_per_microbatch: int = 16384
    """Token budget of one packed micro-batch (large: at RL shapes a micro-batch costs its launches, not FLOPs)."""
    logprob_chunk_size: int = 2048
    """Tokens per chunk of the LM head and log-softmax."""
    ref_offload: bool = True
    """Keep the frozen reference model (built when `loss.kl_coef` > 0) and the distillation teacher on the CPU
    between uses. One sharded like the policy (any run with a process group) keeps its shard on the device."""
    num_minibatches: int = 1
    """Optimizer updates per pass over a rollout batch: each rank's share is cut into this many mini-batches."""
    epochs: int = 1
    """Passes over each rollout batch (each pass makes `num_minibatches` updates)."""
    old_logprobs: Literal["recompute", "rollout"] = "recompute"
    """The ratio's old policy: "recompute" (the policy's logprobs before the first update) or "rollout" (the
    engine's logprobs of the samples)."""
    compile: str = "auto"
    """"auto", "true" or "false": `torch.compile` each block (attention traced in on CUDA) for static sizes, and
    the chunked log-softmax; micro-batches run padded (`Transformer.pad_to`) to a size bucket, so blocks compile
    once per bucket. "auto": on CUDA outside deterministic mode."""
    compile_pad_multiple: int = 1024
    """With `compile`: the unit of the size buckets micro-batches are padded to: unit x (1, 2, 3, 4, 6, 8, 12, 16,
    ...) tokens (`model.transformer.padded_size`; a larger unit: fewer compiled sizes, more padding)."""
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self) -> None:
        for name in ("num_minibatches", "epochs", "compile_pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}: must be >= 1, got {getattr(self, name)}")
        self.compile = {True: "true", False: "false"}.get(self.compile, self.compile)
        if self.compile not in ("auto", "true", "false"):
            raise ValueError(f"trainer.compile: expected auto, true or false, got {self.compile!r}")
        if self.old_logprobs not in ("recompute", "rollout"):
            raise ValueError(f"trainer.old_logprobs: expected recompute or rollout, got {self.old_logprobs!r}")


def _world_rank() -> tuple[int, int]:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def _device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return torch.device("cuda", rank % torch.cuda.device_count())


class Trainer:
    def __init__(
        self,
        model: str | Path | Transformer,
        cfg: TrainerConfig | None = None,
        mesh: ParallelMesh | None = None,
        kl_in_reward: bool = False,
        temperature: float = 1.0,
        deterministic: bool = False,
        critic: CriticConfig | None = None,
        teacher: str | Path | None = None,
    ) -> None:
        """The run's settings that the trainer follows rather than owns:
        - `mesh`: the ranks that train, when they are some of the job's (a disaggregated job's trainer ranks,
          `leagues.parallel.build_mesh(..., ranks=...)`): FSDP2, batch balancing, metrics and checkpoints run over
          them alone. None: every rank of the job, or this process alone when there is no process group.
        - `kl_in_reward`: the KL to the reference (`loss.kl_coef`) shapes the rewards (`kl_rewards`) instead of
          being a loss term.
        - `temperature`: the rollout's sampling temperature; logprobs are computed under it, as the engine does.
        - `deterministic`: batch-invariant kernels (`leagues.kernels.batch_invariant`): the training forward's
          logprobs equal the engine's bit for bit when the engine runs deterministic too (true on-policy).
        - `critic`: train a value model beside the policy (PPO with GAE advantages; `leagues.train.critic`).
        - `teacher`: a frozen teacher's checkpoint, for on-policy distillation (`leagues.train.distill`)."""
        self.cfg = cfg = cfg or TrainerConfig()
        self.kl_in_reward, self.temperature, self.deterministic = kl_in_reward, temperature, deterministic
        self.loss_cfg = replace(cfg.loss, kl_coef=0.0) if kl_in_reward else cfg.loss  # the KL shapes rewards instead
        if cfg.loss.aggregation == "constant" and cfg.loss.max_response_tokens is None:
            raise ValueError("trainer.loss.aggregation constant (Dr.GRPO) needs trainer.loss.max_response_tokens")
        self.device = _device()
        self.compiled = cfg.compile == "true" or (
            cfg.compile == "auto" and self.device.type == "cuda" and not deterministic
        )
        self.alone = mesh is None and not dist.is_initialized()  # no process group: no FSDP, no collectives
        self.world, self.rank = (mesh.dp.size(), mesh.dp.get_local_rank()) if mesh is not None else _world_rank()
        sharded = not isinstance(model, Transformer) and not self.alone and cfg.parallel.sharded_load
        self.model_path = None
        if not isinstance(model, Transformer):
            self.model_path = resolve_model_path(model)
            if sharded:  # built on the meta device; each rank reads only its pieces once the model is sharded
                with torch.device("meta"):
                    model = Transformer(read_config(self.model_path))
            else:
                model = load_pretrained(self.model_path, dtype=torch.float32, device=self.device)
        self.model = model.train()
        if deterministic:
            self.model.set_batch_invariant()
        self.ref = self._frozen(self.model_path, sharded) if cfg.loss.kl_coef > 0 else None  # before sharding
        values = None if critic is None else self._value_model(critic, model, sharded)  # likewise
        self.teacher_path = None if teacher is None else resolve_model_path(teacher)
        self.teacher = None if teacher is None else self._frozen(self.teacher_path, sharded)
        if self.compiled:
            self.model.compile_blocks(pad_to=cfg.compile_pad_multiple, dynamic=False)
        # With a process group: FSDP2, or on one rank compute-dtype copies beside the float32 masters.
        self.mesh = None if self.alone else parallelize(self.model, cfg.parallel, self.world, self.device.type, mesh)
        self.group = None if self.mesh is None else self.mesh.dp.get_group()  # every collective of a step runs on it
        if sharded:
            self._load_shards(self.model, self.model_path)
        others = [(self.ref, self.model_path), (self.teacher, self.teacher_path)]
        others += [(values, self.critic_path)] if values is not None else []
        for other, path in others:  # the reference, teacher and critic sharded like the policy (FSDP2, EP)
            if other is not None and self.mesh is not None:
                parallelize(other, cfg.parallel, self.world, self.device.type, mesh=self.mesh)
                if sharded:
                    self._load_shards(other, path)
        self.critic = None if values is None else Critic(values, critic, self.group)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, compute_copies(self.model))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.step = 0
        self._load_counts: torch.Tensor | None = None

    def _value_model(self, critic: CriticConfig, model: Transformer, sharded: bool) -> ValueModel:
        """The critic's model, its trunk from `critic.model`, else from the policy's checkpoint (or a copy of the
        policy object, taken before it is sharded or trained); on the meta device when each rank reads only its
        pieces once it is sharded."""
        self.critic_path = resolve_model_path(critic.model) if critic.model else self.model_path
        values = value_model(model if self.critic_path is None else self.critic_path, self.device, meta=sharded)
        if self.deterministic:
            values.set_batch_invariant()
        if self.compiled:
            values.compile_blocks(pad_to=self.cfg.compile_pad_multiple, dynamic=False)
        return values

    def _load_shards(self, model: Transformer, path: Path) -> None:
        """Fill a sharded model (the policy, the reference, the teacher or the critic) from its checkpoint `path`,
        one full tensor at a time: no rank ever holds the whole model (with expert parallel, a rank reads only its
        own experts)."""
        dtype = next(model.parameters()).dtype
        model.to_empty(device=self.device)
        experts = None
        if self.cfg.parallel.ep > 1:
            per_rank = model.config.num_experts // self.cfg.parallel.ep
            lo = self.mesh.ep.get_local_rank() * per_rank
            experts = (lo, lo + per_rank)
        named = read_parameters(path, experts)
        if isinstance(model, ValueModel):  # the trunk, then the value head's start
            named = model.own_tensors(named)
        load_full_tensors(model, ((name, t.to(dtype)) for name, t in named))
        reset_buffers(model, self.device)

    def _frozen(self, path: Path | None, sharded: bool) -> Transformer:
        """A frozen model (`leagues.train.frozen`: the reference, or the teacher) from `path`, or with no path a
        copy of the policy given as an object; sharded like the policy after this (with a process group)."""
        dtype = torch.float32 if self.alone else self.cfg.parallel.resolved_param_dtype(self.device.type)
        model = frozen_model(self.model if path is None else path, dtype, self.device, meta=sharded)
        if self.deterministic:
            model.set_batch_invariant()
        return model.to("cpu") if self.alone and self.cfg.ref_offload else model

    # --- forward pieces -----------------------------------------------------------------------

    def _forward_logprobs(
        self,
        model: Transformer,
        mb: MicroBatch,
        with_entropy: bool = False,
        train: bool = False,
        own_routes: bool = False,
    ):
        """Logprobs (and entropy) of the micro-batch's targets, and the forward's output (routes and router
        logits are captured in training passes of MoE models, for the MoE metrics and balance losses).
        `own_routes`: route afresh even under routing replay (a teacher: the rollout's routes are the student's)."""
        replay = self.cfg.moe.routing_replay == "rollout" and not own_routes
        if replay and mb.replay_experts_TLK is None:
            raise ValueError("moe.routing_replay=rollout: the samples carry no routed_experts (record them in rollout)")
        moe = self.cfg.moe
        batch = ForwardBatch.packed(
            mb.input_ids_T,
            mb.lengths,
            compute_logits=False,
            capture_experts=train,
            capture_router_logits=train and (moe.aux_loss_coef > 0 or moe.z_loss_coef > 0),
        )
        batch.replay_experts_TLK = mb.replay_experts_TLK if replay else None
        if train and moe.routing_replay == "train":  # route once, without grad; the grad pass replays it
            with torch.no_grad():
                first = ForwardBatch.packed(mb.input_ids_T, mb.lengths, compute_logits=False, capture_experts=True)
                batch.replay_experts_TLK = model.run(first).routed_experts_TLK
        out = model.run(batch)
        weight_VD = model.embed.weight if model.lm_head is None else model.lm_head.weight
        logprobs_T, entropy_T = token_logprobs(
            out.hidden_TD,
            weight_VD,
            mb.targets_T,
            self.temperature,
            self.cfg.logprob_chunk_size,
            with_entropy=with_entropy,
            entropy_grad=self.cfg.loss.entropy_coef != 0,
            compiled=self.compiled and not self.deterministic,
            invariant=self.deterministic,
        )
        return logprobs_T, entropy_T, out

    def _moe_terms(self, out, mb: MicroBatch, norm: Normalizer) -> tuple[torch.Tensor | float, dict]:
        """Balance-loss share of this micro-batch and its MoE metrics (`moe_terms`); its load counts add up."""
        experts = self.model.config.num_experts
        loss, metrics, counts = moe_terms(out, mb.mask_T, mb.replay_experts_TLK, norm.num_tokens, self.cfg.moe, experts)
        if counts is not None:
            self._load_counts = counts if self._load_counts is None else self._load_counts + counts
        return loss, metrics

    def _microbatches(self, samples: list[Sample]) -> list[MicroBatch]:
        lengths = [input_length(s) for s in samples]
        groups = split_by_tokens(lengths, self.cfg.max_tokens_per_microbatch)
        return [build_microbatch(samples, g, self.device) for g in groups]

    @torch.no_grad()
    def compute_logprobs(
        self, samples: list[Sample], model: Transformer | None = None, own_routes: bool = False
    ) -> list[torch.Tensor]:
        """Response-token logprobs of each sample (CPU float32), under `model` (default: the policy); `own_routes`:
        the model routes afresh, replaying no rollout routes."""
        model = model or self.model
        forward = lambda mb: self._forward_logprobs(model, mb, own_routes=own_routes)[0]  # noqa: E731
        with compute_weights(model):
            return self._per_response_token(samples, forward)

    @torch.no_grad()
    def compute_values(self, samples: list[Sample]) -> list[torch.Tensor]:
        """The critic's value of the state before each response token of each sample (CPU float32)."""
        if self.critic is None:
            raise ValueError("compute_values: this trainer has no critic (advantage.estimator gae trains one)")
        with compute_weights(self.critic.model):
            return self._per_response_token(samples, self.critic.values)

    def _per_response_token(self, samples: list[Sample], forward) -> list[torch.Tensor]:
        """`forward(micro-batch) -> x_T` over the samples' micro-batches, cut into each sample's response part."""
        out: list[torch.Tensor | None] = [None] * len(samples)
        mbs = self._microbatches(samples)
        num_real = len(mbs)
        mbs += self._padding_microbatches(num_real)  # sharded forwards are collective: every rank runs as many
        for index, mb in enumerate(mbs):
            x_T = forward(mb)
            if index >= num_real:
                continue
            x_T = x_T.float().cpu()  # one copy a micro-batch, then host slices
            end = 0
            for length, i in zip(mb.lengths, mb.sample_indices, strict=True):
                end += length  # response targets are each sequence's last positions
                out[i] = x_T[end - len(samples[i].response_ids) : end].clone()
        return out

    def _ref_logprobs(self, samples: list[Sample]) -> list[torch.Tensor] | None:
        return None if self.ref is None else self._frozen_logprobs(self.ref, samples)

    def teacher_logprobs(self, samples: list[Sample]) -> list[torch.Tensor]:
        """The teacher's logprobs of the response tokens at the rollout temperature (every trainer rank together)."""
        if self.teacher is None:
            raise ValueError("teacher_logprobs: this trainer has no teacher (distill.teacher)")
        return self._frozen_logprobs(self.teacher, samples, own_routes=True)

    def _frozen_logprobs(
        self, model: Transformer, samples: list[Sample], own_routes: bool = False
    ) -> list[torch.Tensor]:
        alone = self.mesh is None  # a whole model may wait on the CPU; a shard stays, resharded after each use
        with on_device(model, self.device, offload=alone and self.cfg.ref_offload, sharded=not alone):
            return self.compute_logprobs(samples, model, own_routes)

    def kl_rewards(self, samples: list[Sample]) -> list[float]:
        """KL as reward shaping: for each of this rank's samples, -kl_coef x the sum over its loss-mask response
        tokens of the KL estimate (`loss.kl_estimator`) of the current policy against the reference. The loop
        adds it to the rewards before advantages (every trainer rank calls it together: the policy's forward
        is collective)."""
        if self.ref is None:
            raise ValueError("kl_rewards: trainer.loss.kl_coef is 0, so there is no reference to compare with")
        loss = self.cfg.loss
        policy, ref = self.compute_logprobs(samples), self._ref_logprobs(samples)
        out = []
        for sample, logprobs_T, ref_T in zip(samples, policy, ref, strict=True):
            mask_T = torch.tensor(response_mask(sample), dtype=torch.float32)
            shaped_T = kl_penalty_rewards(logprobs_T, ref_T, mask_T, kl_coef=loss.kl_coef, estimator=loss.kl_estimator)
            out.append(float(shaped_T.sum()))
        return out

    # --- the step ---------------------------------------------------------------------------------

    def _gather(self, samples: list[Sample]) -> list[Sample]:
        """The global batch: every rank's samples, in rank order (the same list on every rank)."""
        if self.world == 1:
            return samples
        gathered: list[list[Sample]] = [None] * self.world  # type: ignore[list-item]
        dist.all_gather_object(gathered, samples, group=self.group)
        return [s for part in gathered for s in part]

    def _share(self, everything: list[Sample]) -> list[Sample]:
        """This rank's part of a global list of samples, balanced across ranks by token count."""
        if self.world == 1:
            return everything
        share = balance([input_length(s) for s in everything], self.world)[self.rank]
        return [everything[i] for i in share]

    def _padding_microbatches(self, count: int) -> list[MicroBatch]:
        """Empty micro-batches so every rank runs as many forward/backward passes as the busiest one.

        FSDP2 (and expert parallel's all-to-all) are collective per pass, so ranks must agree on the
        count; a padding pass is one token with no loss weight: it moves nothing but its collectives.
        """
        if self.world == 1:
            return []
        most = torch.tensor([count], device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
        dummy = Sample(prompt_ids=[0], response_ids=[0], loss_mask=[0], rollout_logprobs=[0.0])
        if self.cfg.moe.routing_replay == "rollout":  # a route for its one token, so replay has one to use
            config = self.model.config
            dummy.routed_experts = torch.arange(config.top_k, dtype=torch.uint8).expand(1, config.num_moe_layers, -1)
        return [build_microbatch([dummy], [0], self.device) for _ in range(int(most) - count)]

    def _normalizer(self, mbs: list[MicroBatch]) -> Normalizer:
        counts = torch.tensor(
            [sum(float(mb.mask_T.sum()) for mb in mbs), float(sum(mb.num_seqs for mb in mbs))], dtype=torch.float64
        )
        if self.world > 1:
            counts = counts.to(self.device)
            dist.all_reduce(counts, group=self.group)
        num_seqs = max(float(counts[1]), 1.0)
        budget = self.cfg.loss.max_response_tokens
        return Normalizer(
            num_tokens=max(float(counts[0]), 1.0),
            num_seqs=num_seqs,
            seq_num_tokens_T=None,
            constant=num_seqs * budget if self.cfg.loss.aggregation == "constant" else None,
        )

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """`num_minibatches` x `epochs` optimizer updates on the global batch made of every rank's `samples`;
        metrics are means over the updates (maxima for `*_max`; `tokens` counts the batch once)."""
        cfg = self.cfg
        everything = self._gather(samples)
        # mini-batches are cut from the global batch, then balanced over ranks: the same updates on any world size
        shares = [self._share(everything[i :: cfg.num_minibatches]) for i in range(cfg.num_minibatches)]
        policy = self.policy_moves
        recompute = policy and cfg.num_minibatches * cfg.epochs > 1 and cfg.old_logprobs == "recompute"
        refs = [None if self.kl_in_reward or not policy else self._ref_logprobs(share) for share in shares]
        olds = [self.compute_logprobs(share) if recompute else None for share in shares]  # before any update
        updates = []
        for _ in range(cfg.epochs):
            for share, ref, old in zip(shares, refs, olds, strict=True):
                updates.append(self._update(share, ref, old, policy))
        self.step += 1  # rollout batches trained on (the schedule counts optimizer updates)
        return merge_updates(updates, cfg.epochs)

    @property
    def policy_moves(self) -> bool:
        """False during the critic's warm-up steps, in which only the critic trains."""
        return self.critic is None or self.step >= self.critic.cfg.warmup_steps

    def _update(self, samples: list[Sample], ref, old, policy: bool = True) -> dict[str, float]:
        """One optimizer update on this rank's `samples` (every rank calls it together): the policy's passes
        (unless `policy` is off), then the critic's over the same micro-batches, then each model's step."""
        mbs = self._microbatches(samples)
        norm = self._normalizer(mbs)
        num_real = len(mbs)
        mbs += self._padding_microbatches(num_real)
        totals: dict[str, float] = {}
        step_metrics: dict[str, float] = {}
        self._load_counts = None
        if policy:

            def policy_loss(i: int, mb: MicroBatch):
                real = i < num_real  # a padding pass has no sample of its own to look up
                return self._microbatch_loss(mb, norm, ref if real else None, old if real else None, samples)

            totals |= self._passes(self.model, mbs, policy_loss, loss_key="loss")
            params = list(self.model.parameters())
            step = optimizer_step(params, self.optimizer, self.scheduler, self.cfg.optim, self.group)
            self.optimizer.zero_grad(set_to_none=True)  # the next step starts from clean gradients
            refresh(self.model)  # one rank: the compute copies cast now, a cost of the step, not of the sync
            step_metrics |= {k: float(v) for k, v in step.items()}
        if self.critic is not None:
            totals |= self._passes(self.critic.model, mbs, lambda i, mb: self.critic.loss(mb, norm))
            step_metrics |= self.critic.step()
        reduced = explained_variance(reduce_over_ranks(totals, self.world, self.device, self.group))
        return reduced | (self._load_metrics() if policy else {}) | step_metrics

    def _passes(self, model, mbs: list[MicroBatch], loss_fn, loss_key: str | None = None) -> dict[str, float]:
        """Forward and backward of `model` over the micro-batches (`loss_fn(index, mb) -> (loss, metrics)`);
        returns the metrics' token-weighted sums (maxima for `*_max`), the token count, and the loss's sum under
        `loss_key`."""
        totals: dict[str, float] = {}
        with compute_weights(model):
            for i, mb in enumerate(mbs):
                if self.mesh is not None:
                    set_last_microbatch(model, self.cfg.parallel, last=i == len(mbs) - 1)
                loss, metrics = loss_fn(i, mb)
                loss.backward()  # a share of the global loss; FSDP sums the shares (grad_reduce "sum")
                accumulate(totals, metrics, float(mb.mask_T.sum()))
                if loss_key is not None:
                    totals[loss_key] = totals.get(loss_key, 0.0) + float(loss.detach())
        return totals

    def _load_metrics(self) -> dict[str, float]:
        """Expert load of the step's routed slots over all ranks (MoE models)."""
        config = self.model.config
        if not config.num_moe_layers:
            return {}
        counts = self._load_counts
        if counts is None:
            counts = torch.zeros(config.num_moe_layers, config.num_experts, dtype=torch.long, device=self.device)
        if self.world > 1:
            dist.all_reduce(counts, group=self.group)
        if self.cfg.moe.bias_update_rate > 0:  # every rank has the global counts: biases stay identical
            update_expert_bias([b for _, b in self._expert_biases()], counts, self.cfg.moe.bias_update_rate)
        return load_metrics(counts.cpu())

    def _expert_biases(self) -> list[tuple[str, torch.Tensor]]:
        """The routers' balancing biases (buffers, replicated on every rank), by the model's names."""
        return [
            (name.replace(_CHECKPOINT_PREFIX, ""), buf)
            for name, buf in self.model.named_buffers()
            if name.endswith("expert_bias")
        ]

    def _microbatch_loss(self, mb: MicroBatch, norm: Normalizer, ref, old, samples: list[Sample]):
        logprobs_T, entropy_T, out = self._forward_logprobs(self.model, mb, with_entropy=True, train=True)
        if self.cfg.old_logprobs == "rollout":
            old_T = mb.rollout_logprobs_T
        else:
            old_T = logprobs_T.detach() if old is None else self._token_aligned(mb, old, samples)
        moe_loss, moe_metrics = self._moe_terms(out, mb, norm)
        seq_tokens = torch.zeros(mb.num_seqs, device=self.device).index_add_(0, mb.seq_ids_T, mb.mask_T)
        norm.seq_num_tokens_T = seq_tokens[mb.seq_ids_T].clamp(min=1.0)
        inputs = LossInputs(
            logprobs_T=logprobs_T,
            old_logprobs_T=old_T,
            advantages_T=mb.advantages_T,
            mask_T=mb.mask_T,
            seq_ids_T=mb.seq_ids_T,
            num_seqs=mb.num_seqs,
            rollout_logprobs_T=mb.rollout_logprobs_T,
            ref_logprobs_T=self._ref_aligned(mb, ref, samples, logprobs_T),
            entropy_T=entropy_T,
        )
        loss, metrics = policy_loss(inputs, self.loss_cfg, norm)
        return loss + moe_loss, metrics | moe_metrics

    def _ref_aligned(self, mb: MicroBatch, ref, samples: list[Sample], logprobs_T: torch.Tensor):
        """The reference's logprobs on the micro-batch's positions; for a padding pass (no sample, no loss token)
        zeros where the loss needs a KL term, which the loss then compares on no token."""
        if ref is not None:
            return self._token_aligned(mb, ref, samples)
        return torch.zeros_like(logprobs_T.detach()) if self.loss_cfg.kl_coef > 0 else None

    def _token_aligned(self, mb: MicroBatch, per_sample: list[torch.Tensor], samples: list[Sample]) -> torch.Tensor:
        """Per-sample response logprobs laid out on the micro-batch's packed target positions (0 elsewhere)."""
        parts = []
        for i in mb.sample_indices:
            pad = torch.zeros(len(samples[i].prompt_ids) - 1)
            parts.append(torch.cat([pad, per_sample[i]]))
        return torch.cat(parts).to(self.device)

    # --- weights out, checkpoints -------------------------------------------------------------------

    def state_dict_for_sync(
        self, bucket_bytes: int = 512 * 2**20, dtype: torch.dtype | None = None
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full (unsharded) weights in buckets of about `bucket_bytes`, under the model's parameter names.

        `dtype`: the receiver's, given by a receiver that copies each tensor in place (casting as it copies).
        On one rank it then gets one bucket of the forward's own weights (`whole_parameters`: the compute copies,
        no gather). When it is the sharded model's compute dtype, each FSDP unit is gathered whole in it
        (`unit_buckets`: half the bytes of float32, a few large collectives), valid until the next is requested."""
        biases = [(n, b.detach().clone()) for n, b in self._expert_biases()] if self.cfg.moe.bias_update_rate else []
        if self.mesh is not None and self.world == 1 and dtype is not None:
            yield whole_parameters(self.model) + biases
            return
        if self.mesh is not None and dtype == self.cfg.parallel.resolved_param_dtype(self.device.type):
            yield from unit_buckets(self.model)
            if biases:  # the engine must pick experts with the same biases
                yield biases
            return
        named = (
            full_state_dict(self.model)
            if self.mesh is not None
            else ((n, p.detach()) for n, p in self.model.named_parameters())
        )
        named = itertools.chain(named, biases)
        bucket, size = [], 0
        for name, tensor in named:
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket

    def save(self, root: str | Path, extra: dict | None = None, keep_last: int = 3) -> Path:
        """A checkpoint of step `self.step` under `root`; `keep_last` > 0 deletes all but that many newest."""
        extra = {"trainer_step": self.step, **(extra or {})}
        if self.cfg.moe.bias_update_rate > 0:  # non-persistent buffers: not in the model's state dict
            extra["expert_bias"] = {n: b.tolist() for n, b in self._expert_biases()}
        with on_group(self.group):
            return save_checkpoint(
                root, self.step, self.model, self.optimizer, self.scheduler, extra, keep_last, self._parts()
            )

    def load(self, path: str | Path) -> dict:
        with on_group(self.group):
            extra = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self._parts())
        self.step = extra.pop("trainer_step", self.step)
        saved = extra.pop("expert_bias", {})
        for name, buf in self._expert_biases():
            if name in saved:
                buf.copy_(torch.tensor(saved[name], dtype=buf.dtype))
        return extra

    def _parts(self) -> dict[str, Part]:
        """What the checkpoint holds beside the policy: the critic, when there is one."""
        if self.critic is None:
            return {}
        return {"critic": Part(self.critic.model, self.critic.optimizer, self.critic.scheduler)}
