"""The critic of PPO: a value model, its clipped value loss, and its own optimizer.

Sits beside the policy inside the `Trainer` (`Trainer(..., critic=CriticConfig())`, with
`advantage.estimator gae`):

    trainer.compute_values(samples)    once per rollout batch: the critic's value of each response token's state
    (GAE, `leagues.train.advantages`)  per-token advantages for the policy, returns for the critic
    trainer.train_step(samples)        every update: the policy's passes, then the critic's, then both step

Decisions:
- The value model is the policy's family with the LM head replaced by a scalar head (`ValueModel`), started
  from the policy's checkpoint (after any warm start) or from `critic.model`; the head starts at zero, so the
  first values are 0 and the first advantages are GAE of the rewards alone. It is sharded and stepped like the policy
  (FSDP2 on the same mesh, expert parallel when on; the same micro-batches, padding passes and mini-batches)
  with its own AdamW and schedule, and checkpointed with it (`Part` of the trainer's checkpoint).
- Values are read at the positions whose logits score each response token: V_t is the value of the state
  before response token t, so the values line up with the logprobs, the mask and GAE's steps.
- The value loss is PPO's clipped one (Schulman et al. 2017; as in OpenAI's baselines): 1/2 max((V - R)^2,
  (V_old + clip(V - V_old, -c, c) - R)^2), V_old being the values computed once per rollout batch. It is a
  token mean over the global batch (the trainer's `Normalizer`), so the gradient does not depend on the split.
- `warmup_steps`: the first RL steps train only the critic (the policy does not move and its schedule does not
  advance), so the first advantages the policy learns from come from a critic that has seen some returns.
- Explained variance, 1 - Var(R - V) / Var(R) over the global batch's loss tokens, is computed from token
  means the trainer reduces like every other metric (`explained_variance`).
- A colocated GPU run plans the engine's KV cache around both models' training state, the critic's planned from
  its value model's shape (`leagues.loop.memory.trainer_state`); the memory note logged before anything is built
  names the critic's part beside the policy's.

Legend: T tokens of a micro-batch (packed, flat), D model dim.
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from leagues.model import ForwardBatch, Transformer
from leagues.model.checkpoint import read_config, read_parameters, reset_buffers
from leagues.model.config import ModelConfig
from leagues.parallel import compute_copies, refresh
from leagues.train.losses import Normalizer, masked_mean
from leagues.train.optim import OptimConfig, build_optimizer, build_scheduler, optimizer_step
from leagues.train.packing import MicroBatch


@dataclass(kw_only=True, slots=True)
class CriticConfig:
    model: str = ""
    """Checkpoint directory or built-in model name of the value model's trunk (the policy's family); empty: the
    checkpoint the policy starts from (after the warm start)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """The critic's own AdamW and learning-rate schedule (`total_steps` 0: the run's number of updates)."""
    value_clip: float | None = 0.5
    """Clipped value loss: a value may move at most this far from the rollout batch's values before its error
    stops counting (the larger of the clipped and unclipped errors is taken); None: plain squared error."""
    warmup_steps: int = 0
    """RL steps at the start in which only the critic trains: the policy does not move until its values have
    seen that many rollout batches. Not the learning-rate warmup (`critic.optim.warmup_steps`)."""

    def __post_init__(self) -> None:
        if self.value_clip is not None and self.value_clip <= 0:
            raise ValueError(f"critic.value_clip: must be > 0 (null: no clip), got {self.value_clip}")
        if self.warmup_steps < 0:
            raise ValueError(f"critic.warmup_steps: must be >= 0, got {self.warmup_steps}")


class ValueModel(Transformer):
    """The family's transformer with a scalar value head instead of the LM head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.lm_head = None
        self.value_head = nn.Linear(cfg.dim, 1)

    def values(self, batch: ForwardBatch) -> Tensor:
        """values_T (float32): the value of the state at every position of the packed batch."""
        hidden_TD = self.run(batch).hidden_TD
        return self.value_head(hidden_TD).squeeze(-1).float()

    def own_tensors(self, named: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """Of a policy's (name, tensor) pairs those this model takes (all but the LM head), then the value head's
        start: zero, so every value starts at 0."""
        yield from ((name, t) for name, t in named if not name.startswith("lm_head."))
        yield from (("value_head.weight", torch.zeros(1, self.config.dim)), ("value_head.bias", torch.zeros(1)))


def value_model(source: str | Transformer, device: torch.device, meta: bool = False) -> ValueModel:
    """A value model (float32) whose trunk is a checkpoint directory's or a policy object's (copied), with the
    head at zero. `meta`: built on the meta device, for a sharded load of the checkpoint afterwards."""
    config = source.config if isinstance(source, Transformer) else read_config(source)
    with torch.device("meta"):
        model = ValueModel(config)
    if meta:
        return model
    named = source.named_parameters() if isinstance(source, Transformer) else read_parameters(source)
    state = {n: t.detach().to(device=device, dtype=torch.float32, copy=True) for n, t in model.own_tensors(named)}
    model.load_state_dict(state, assign=True, strict=True)
    reset_buffers(model, device)
    return model


def value_loss(
    values_T: Tensor, old_values_T: Tensor, returns_T: Tensor, mask_T: Tensor, clip: float | None, norm: Normalizer
) -> tuple[Tensor, dict[str, Tensor]]:
    """This micro-batch's share of the global value loss (a token mean), and its metrics (token means)."""
    error_T = (values_T - returns_T).square()
    loss_T = error_T
    metrics = {}
    if clip is not None:
        clipped_T = old_values_T + (values_T - old_values_T).clamp(-clip, clip)
        clipped_error_T = (clipped_T - returns_T).square()
        loss_T = torch.maximum(error_T, clipped_error_T)
        metrics["critic/clip_frac"] = masked_mean(clipped_error_T > error_T, mask_T)
    loss_T = 0.5 * loss_T
    loss = torch.where(mask_T > 0, loss_T * mask_T, 0.0).sum() / norm.num_tokens
    residual_T = (returns_T - values_T).detach()
    metrics |= {
        "critic/value_loss": masked_mean(loss_T, mask_T),
        "critic/value_mean": masked_mean(values_T, mask_T),
        "critic/returns_mean": masked_mean(returns_T, mask_T),
        "critic/returns_sq_mean": masked_mean(returns_T.square(), mask_T),
        "critic/residual_mean": masked_mean(residual_T, mask_T),
        "critic/residual_sq_mean": masked_mean(residual_T.square(), mask_T),
    }
    return loss, metrics


def explained_variance(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with the moments `value_loss` reports replaced by 1 - Var(R - V) / Var(R) (0 when the
    returns do not vary); `critic/returns_mean` stays. Metrics without the moments come back as they were."""
    if "critic/returns_sq_mean" not in metrics:
        return metrics
    out = dict(metrics)
    var_returns = out.pop("critic/returns_sq_mean") - out["critic/returns_mean"] ** 2
    var_residual = out.pop("critic/residual_sq_mean") - out.pop("critic/residual_mean") ** 2
    out["critic/explained_variance"] = 1.0 - var_residual / var_returns if var_returns > 1e-12 else 0.0
    return out


class Critic:
    """The value model with its optimizer and schedule; the trainer builds and shards the model, then this."""

    def __init__(self, model: ValueModel, cfg: CriticConfig, group=None) -> None:
        """`group`: the ranks the model is sharded over (its gradient norm is theirs; None: every rank)."""
        self.model, self.cfg, self.group = model.train(), cfg, group
        self.optimizer = build_optimizer(model.parameters(), cfg.optim, compute_copies(model))
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)

    def values(self, mb: MicroBatch) -> Tensor:
        """values_T of the micro-batch's positions (with grad when grad is on)."""
        return self.model.values(ForwardBatch.packed(mb.input_ids_T, mb.lengths, compute_logits=False))

    def loss(self, mb: MicroBatch, norm: Normalizer) -> tuple[Tensor, dict[str, Tensor]]:
        """The clipped value loss of one micro-batch (a padding pass, with no loss token, contributes 0)."""
        values_T = self.values(mb)
        old_T, returns_T = mb.values_T, mb.returns_T
        if old_T is None or returns_T is None:
            if bool(mb.mask_T.any()):
                raise ValueError("critic: the samples carry no values and returns (advantage.estimator gae sets them)")
            old_T = returns_T = torch.zeros_like(values_T.detach())
        return value_loss(values_T, old_T, returns_T, mb.mask_T, self.cfg.value_clip, norm)

    def step(self) -> dict[str, float]:
        """One guarded optimizer step on the accumulated gradients, which it then clears."""
        params = list(self.model.parameters())
        metrics = optimizer_step(params, self.optimizer, self.scheduler, self.cfg.optim, self.group)
        self.optimizer.zero_grad(set_to_none=True)
        refresh(self.model)  # one rank: its compute copies cast now
        return {f"critic/{k}": float(v) for k, v in metrics.items()}
