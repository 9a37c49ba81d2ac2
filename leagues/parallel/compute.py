"""One rank, no FSDP: the model keeps its float32 master weights and runs its passes on compute-dtype copies.

    apply_compute_copies(model, torch.bfloat16)  # what `parallelize` does on a mesh of one rank
    with compute_weights(model):                 # forward and backward inside run on the bf16 copies;
        loss = ...; loss.backward()              # each copy's gradient is added, in float32, to its master's
    refresh(model)                               # after the optimizer step: the masters cast into the copies
    whole_parameters(model)                      # (leagues.parallel.fsdp) the copies: what the forward uses

Why: on a group of one, FSDP2's mixed precision still does a sharded run's work on every pass: a cast and an
all-gather copy into the unsharded parameters before each unit's forward (again before its backward under
resharding), a chunk-cat and a reduce-scatter copy of each gradient after the backward (27 ms of a 132 ms step
on one H200 at the `wide` shape). Here the cast runs once per optimizer step, each gradient is folded into its
master once per backward, and the copies stay between steps, so a weight sync reads the forward's very weights,
already in the engine's dtype.

Decisions:
- At rest the modules hold their masters: state dicts, checkpoints, the optimizer and the gradient norm see float32
  as they would without this. `compute_weights` swaps the copies into the modules for its block and back after,
  so a backward (and activation checkpointing's recompute) must run inside the block that ran its forward.
- A copy is cast again when its master changed since its last cast (the master's version counter and storage): an
  optimizer step, a checkpoint load, an in-place edit. `refresh` right after the optimizer step makes the cast the
  step's cost rather than the next reader's; `compute_weights` and `whole_parameters` refresh what is stale anyway.
- Gradients: a hook after autograd accumulates a copy's gradient adds it into its master's float32 `.grad` and
  frees it, so micro-batches accumulate in float32 (as FSDP's unsharded accumulation does) and no full set of
  compute-dtype gradients is alive at once.
- Parameters already in the compute dtype (a frozen model kept in it) get no copy: the swap skips them.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

ATTRIBUTE = "_compute_copies"


class ComputeCopies:
    """The copies of one model's parameters that are not already in `dtype`, tied ones once."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.slots: list[tuple[nn.Module, str, int]] = []  # (module, parameter name, index of its copy)
        index: dict[int, int] = {}
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is None or not param.is_floating_point() or param.dtype == dtype:
                    continue
                self.slots.append((module, name, index.setdefault(id(param), len(index))))
        self.copies: list[nn.Parameter | None] = [None] * len(index)
        self.cast_from: list[tuple | None] = [None] * len(index)  # (version, data_ptr) of the master last cast
        self.masters: list[torch.Tensor | None] = [None] * len(index)  # while swapped in: where gradients go
        self.depth = 0

    def _current_masters(self) -> list[torch.Tensor]:
        masters: list[torch.Tensor | None] = [None] * len(self.copies)
        for module, name, i in self.slots:
            masters[i] = module._parameters[name]
        return masters

    def refresh(self) -> None:
        """Cast every master that changed since its copy was made (one multi-tensor copy)."""
        assert self.depth == 0, "refresh inside compute_weights: the modules hold the copies"
        stale_copies, stale_masters = [], []
        for i, master in enumerate(self._current_masters()):
            if master.device.type == "meta":
                continue
            mark = (master._version, master.data_ptr())
            copy = self.copies[i]
            if copy is None or copy.shape != master.shape or copy.device != master.device:
                copy = self.copies[i] = self._new_copy(master, i)
            elif self.cast_from[i] == mark:
                continue
            stale_copies.append(copy)
            stale_masters.append(master)
            self.cast_from[i] = mark
        if stale_copies:
            with torch.no_grad():
                torch._foreach_copy_(stale_copies, stale_masters)

    def _new_copy(self, master: torch.Tensor, i: int) -> nn.Parameter:
        copy = nn.Parameter(torch.empty_like(master, dtype=self.dtype), requires_grad=master.requires_grad)
        if master.requires_grad:
            copy.register_post_accumulate_grad_hook(self._fold_into(i))
        return copy

    def _fold_into(self, i: int):
        def fold(copy: torch.Tensor) -> None:
            master = self.masters[i]
            assert master is not None, "a backward outside compute_weights reached a compute copy"
            if master.grad is None:
                master.grad = copy.grad.to(master.dtype)
            else:
                master.grad.add_(copy.grad)
            copy.grad = None

        return fold

    @contextmanager
    def swapped(self) -> Iterator[None]:
        if self.depth == 0:
            self.refresh()
            self.masters = self._current_masters()
            for module, name, i in self.slots:
                module._parameters[name] = self.copies[i]
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for module, name, i in self.slots:
                    module._parameters[name] = self.masters[i]

    def targets(self) -> dict[int, torch.Tensor]:
        """id(master) -> its copy, for the masters whose copy exists (as they are, not refreshed): where an
        optimizer that writes the copies itself (`leagues.train.optim.CastingAdamW`) writes them."""
        return {id(m): self.copies[i] for i, m in enumerate(self._current_masters()) if self.copies[i] is not None}

    def mark_cast(self, masters: list[torch.Tensor]) -> None:
        """`masters` were just written, and their copies with them, outside torch's in-place ops (a Triton kernel):
        count the write on each master (its version counter) and record its copy as fresh."""
        index = {id(m): i for i, m in enumerate(self._current_masters())}
        for master in masters:
            torch.autograd.graph.increment_version(master)
            self.cast_from[index[id(master)]] = (master._version, master.data_ptr())

    def named_copies(self) -> dict[int, torch.Tensor]:
        """id(master) -> its copy, refreshed."""
        self.refresh()
        return self.targets()


def apply_compute_copies(model: nn.Module, dtype: torch.dtype) -> None:
    """Give `model` compute copies in `dtype` of its other-dtype floating parameters (made at first use)."""
    setattr(model, ATTRIBUTE, ComputeCopies(model, dtype))


def compute_copies(model: nn.Module) -> ComputeCopies | None:
    return getattr(model, ATTRIBUTE, None)


@contextmanager
def compute_weights(model: nn.Module) -> Iterator[None]:
    """Inside: `model`'s modules hold the compute copies (refreshed first); nothing to do for a model without."""
    copies = compute_copies(model)
    if copies is None:
        yield
        return
    with copies.swapped():
        yield


def refresh(model: nn.Module) -> None:
    """Cast the masters that changed into their copies now (after an optimizer step); no-op without copies."""
    copies = compute_copies(model)
    if copies is not None:
        copies.refresh()
