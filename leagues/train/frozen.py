"""Frozen models beside the policy: the KL reference and the distillation teacher.

Sits inside the `Trainer`, which builds them before the policy is sharded and shards them like the policy
afterwards (FSDP2 and expert parallel on the same mesh, sharded load); each scores a rollout batch without grad.

Decisions:
- A frozen model never steps: with a process group it is kept in the compute dtype (no float32 master copy);
  alone it stays float32 and, with `ref_offload`, waits on the CPU between uses (`on_device`).
- A sharded one is resharded after each scoring pass (`leagues.parallel.reshard`): with no backward to do it,
  FSDP would keep its units gathered between uses. So between uses it holds only its shard, and the memory plan
  (`leagues.parallel.frozen_memory`) counts the gathered units only while it scores.
- Parameters only are cast: buffers (rotary tables) stay as built, as the policy's are.
"""

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from leagues.model import Transformer, load_pretrained
from leagues.model.checkpoint import read_config
from leagues.parallel import reshard


def frozen_model(source: Path | Transformer, dtype: torch.dtype, device: torch.device, meta: bool) -> Transformer:
    """A frozen model in eval mode in `dtype`: the checkpoint at `source` (on the meta device with `meta`, for a
    sharded load afterwards), or a copy of a model object (taken before that one is sharded or trained)."""
    if isinstance(source, Transformer):
        model = copy.deepcopy(source)
    elif meta:
        with torch.device("meta"):
            model = Transformer(read_config(source))
    else:
        model = load_pretrained(source, dtype=torch.float32, device=device)
    model.eval().requires_grad_(False)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


@contextmanager
def on_device(model: Transformer, device: torch.device, offload: bool, sharded: bool) -> Iterator[Transformer]:
    """The model on `device` inside; after, back on the CPU when `offload` (a model kept there between uses), or
    resharded when `sharded` (FSDP would keep its units gathered: no backward reshards them)."""
    if offload:
        model.to(device)
    try:
        yield model
    finally:
        if offload:
            model.to("cpu")
        if sharded:
            reshard(model)
