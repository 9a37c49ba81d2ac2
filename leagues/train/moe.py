"""MoE-specific training settings: rollout routing replay (R3) and the router-agreement metric.

Where it sits: the trainer's forward. With `routing_replay="rollout"` every micro-batch replays the experts
the engine chose for each token (recorded during rollout and carried on the samples), so the policy being
optimised routes exactly as the one that sampled. Otherwise the trainer routes by itself and, when the
samples carry rollout routes, measures how often the two disagree (`moe/route_mismatch_frac`).

Decisions:
- A run that asks for replay and meets a sample without routes, or with routes of the wrong shape, raises
  naming the sample: silently falling back to the trainer's own routing would hide the very mismatch R3
  exists to remove.
- Disagreement compares expert SETS per (token, layer): top-k order is irrelevant to the output.

Legend: T tokens, L MoE layers, K top-k.
"""

from dataclasses import dataclass

import torch

ROUTING_REPLAY = ("none", "rollout")


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    routing_replay: str = "none"
    """none: the trainer routes by itself; rollout: replay the engine's routes (R3) in every training forward
    (samples must carry them: the loop then asks the engine to record them)."""

    def __post_init__(self) -> None:
        if self.routing_replay not in ROUTING_REPLAY:
            raise ValueError(
                f"moe.routing_replay: expected one of {', '.join(ROUTING_REPLAY)}, got {self.routing_replay!r}"
            )


def route_mismatch_frac(trainer_TLK: torch.Tensor, rollout_TLK: torch.Tensor) -> torch.Tensor:
    """Fraction of (token, layer) pairs whose expert sets differ between the trainer and the rollout."""
    mine = trainer_TLK.long().sort(dim=-1).values
    theirs = rollout_TLK.to(mine.device).long().sort(dim=-1).values
    return (mine != theirs).any(dim=-1).float().mean()
