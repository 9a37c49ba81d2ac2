"""What one rank of the trainer keeps resident, planned from the model's shape before anything is allocated.

    plan = trainer_memory(model_config, parallel_cfg, world_size)   # bytes per rank, by part
    print(format_plan(plan))
    frozen = frozen_memory(model_config, parallel_cfg, world_size)  # a KL reference or a distillation teacher

The layout is `parallelize`'s: dense parameters FSDP-sharded over all ranks (dim 0, padded), experts split
over `ep` ranks and then sharded over `dp_ep`, so a rank holds about 1/world of the float32 master weights
and of AdamW's two moments. With "sharded" gradient accumulation the gradients are sharded too, and one
FSDP unit (a block: its dense part and its own experts) is gathered at a time, the next one prefetched;
with "unsharded" accumulation a rank keeps every dense parameter and its own experts gathered in the
compute dtype through the step, with their full float32 gradients (reduced to shards unit by unit at the
end, so the sharded gradients never add to them). `cpu_offload` moves the sharded parts
to host memory. Activations and the logits follow the micro-batch: `activation_bytes` estimates them on top
of this floor. The engine's KV cache is planned by the RL loop (`leagues.loop.memory`).

Beside the policy: a critic is a second trained model (`trainer_memory` of its value model, built on the meta
device); a frozen model (`frozen_memory`) is laid out the same way but kept in the compute dtype, with no
gradients or optimizer state, and its units are gathered only while it scores (the trainer reshards it after).
On one rank nothing is sharded (`parallelize`): the policy's compute copies stay between steps (counted as
`gathered`) and a frozen model, already in the compute dtype, gathers nothing.
"""

import math

import torch
from torch import nn

from leagues.model import ModelConfig, Transformer
from leagues.model.moe import GroupedExperts

MASTER_BYTES = 4  # float32 master weights, gradients and AdamW moments
ADAM_MOMENTS = 2


def _shard(shape: torch.Size, ranks: int) -> int:
    """Elements of one rank's FSDP shard of a tensor: dim 0 split in `ranks` padded pieces."""
    if not shape:
        return 1
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def _shapes(model: ModelConfig | nn.Module) -> nn.Module:
    """The model whose parameters are planned: one given (built on the meta device), or a `Transformer` of the
    config built there."""
    if isinstance(model, nn.Module):
        return model
    with torch.device("meta"):
        return Transformer(model)


def _layout(model: nn.Module, cfg, world: int) -> tuple[int, int, list[int]]:
    """A rank's share of `model` in elements, as `parallelize` lays it out: its FSDP shards, its part gathered
    (every dense parameter and its own experts), and each block's gathered part (the FSDP units of a pass)."""
    ep, dp_ep = cfg.ep, world // cfg.ep
    sharded = full = 0
    blocks: list[int] = []
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, GroupedExperts):
                local = p.shape[0] // ep
                sharded += _shard(torch.Size([local, *p.shape[1:]]), dp_ep)
                full += local * math.prod(p.shape[1:])
            else:
                sharded += _shard(p.shape, world)
                full += p.numel()
        if name.count(".") == 1 and name.startswith("layers."):  # one block: the FSDP unit of the step
            experts = sum(p.numel() for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
            blocks.append(sum(p.numel() for p in module.parameters()) - experts + experts // ep)
    return sharded, full, blocks


def _gathered(full: int, blocks: list[int], cfg, world: int) -> int:
    """Elements a rank holds gathered in a pass: everything with "unsharded" accumulation (no unit is resharded
    after its forward) or on one rank (the compute copies, kept between steps), else the root (embeddings, final
    norm, output layer) and two blocks (one computing, the next prefetched)."""
    if cfg.grad_accumulation == "unsharded" or (world == 1 and not cfg.cpu_offload):
        return full
    return full - sum(blocks) + 2 * max(blocks, default=0)


def trainer_memory(model: ModelConfig | nn.Module, cfg, world: int, compute_bytes: int = 2) -> dict[str, int]:
    """Bytes per rank, by part: `params` (master shards), `grads`, `optimizer`, `gathered` (parameters in the
    compute dtype while a step runs), `host` (what `cpu_offload` keeps off the device), and `device`, the sum
    of what stays on the device. `model`: the model's config, or the model built on the meta device (a critic's
    value model); `cfg` is a `ParallelConfig`."""
    sharded, full, blocks = _layout(_shapes(model), cfg, world)
    gathered = _gathered(full, blocks, cfg, world) * compute_bytes
    # unsharded accumulation: full gradients, reduced to shards unit by unit at the end, freed as it goes
    grads = (full if cfg.grad_accumulation == "unsharded" else sharded) * MASTER_BYTES
    params, optimizer = sharded * MASTER_BYTES, ADAM_MOMENTS * sharded * MASTER_BYTES
    host = 0
    if cfg.cpu_offload:  # the sharded parts; full gradients of unsharded accumulation stay on the device
        host = params + optimizer + (grads if cfg.grad_accumulation == "sharded" else 0)
    device = params + grads + optimizer + gathered - host
    return {
        "params": params,
        "grads": grads,
        "optimizer": optimizer,
        "gathered": gathered,
        "host": host,
        "device": device,
    }


def frozen_memory(
    model: ModelConfig | nn.Module, cfg, world: int, compute_bytes: int = 2, grouped: bool = True, offload: bool = False
) -> dict[str, int]:
    """Bytes per rank of a frozen model beside the policy (the KL reference, a distillation teacher;
    `leagues.train.frozen`), by part: `resident` (on the device between its uses), `host` (in host memory then)
    and `scoring` (what its scoring pass adds on the device, freed after it).

    `grouped` (the trainer has a process group): sharded like the policy and kept in the compute dtype, its
    shard resident (in host memory with `cpu_offload`) and its units gathered while it scores, as the policy's
    are in a step. Alone: the whole model in float32, on the device throughout, or with `offload`
    (`trainer.ref_offload`) on the CPU between uses and whole on the device while it scores."""
    shapes = _shapes(model)
    if not grouped:
        whole = sum(p.numel() for p in shapes.parameters()) * MASTER_BYTES  # float32, as the master weights
        return (
            {"resident": 0, "host": whole, "scoring": whole}
            if offload
            else {"resident": whole, "host": 0, "scoring": 0}
        )
    sharded, full, blocks = _layout(shapes, cfg, world)
    shard = sharded * compute_bytes
    return {
        "resident": 0 if cfg.cpu_offload else shard,
        "host": shard if cfg.cpu_offload else 0,
        "scoring": 0 if world == 1 and not cfg.cpu_offload else _gathered(full, blocks, cfg, world) * compute_bytes,
    }


def format_plan(plan: dict[str, int]) -> str:
    gb = {k: v / 1e9 for k, v in plan.items()}
    text = (
        f"{gb['device']:.1f} GB per rank on the device before activations: master weights {gb['params']:.1f}, "
        f"gradients {gb['grads']:.1f}, optimizer {gb['optimizer']:.1f}, gathered weights {gb['gathered']:.1f}"
    )
    return text + (f"; {gb['host']:.1f} GB in host memory (cpu_offload)" if plan["host"] else "")


ACTIVATION_SAFETY = 1.5
"""Factor over the counted activations: autograd's temporaries, kernels' workspaces, allocator fragmentation."""


def activation_bytes(config: ModelConfig, tokens: int, cfg, logprob_chunk: int, compute_bytes: int = 2) -> int:
    """Peak bytes of one training micro-batch of `tokens` tokens (an estimate, with `ACTIVATION_SAFETY`): what
    autograd keeps per layer (norm inputs and outputs, q/k/v, attention output; for MoE layers the router's
    float32 logits and, per routed copy, the permuted input, the gate/up output, its activation and the expert
    output), every layer's or, with `activation_checkpointing`, only the blocks' inputs plus one layer's, and
    one chunk of the LM head and log-softmax in float32 (logits, probabilities, their gradient)."""
    d, heads, kv_heads, head_dim = config.dim, config.num_heads, config.num_kv_heads, config.head_dim
    attention = 4 * d + 3 * heads * head_dim + 2 * kv_heads * head_dim
    moe = config.top_k * (2 * d + 3 * config.expert_ffn_dim) + 2 * config.num_experts + 3 * config.shared_expert_ffn_dim
    dense = 3 * config.ffn_dim + 2 * d
    per_layer = [attention + (moe if i in config.moe_layers else dense) for i in range(config.num_layers)]
    checkpointed = config.num_layers * d + max(per_layer, default=0)  # block inputs, one layer recomputed
    kept = checkpointed if cfg.activation_checkpointing else sum(per_layer)
    head = min(tokens, logprob_chunk) * config.vocab_size * 4 * 3
    return int(ACTIVATION_SAFETY * (tokens * kept * compute_bytes + head))
