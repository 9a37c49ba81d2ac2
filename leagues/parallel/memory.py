"""What one rank of the trainer keeps resident, planned from the model's shape before anything is allocated.

    plan = trainer_memory(model_config, parallel_cfg, world_size)   # bytes per rank, by part
    print(format_plan(plan))

The layout is `parallelize`'s: dense parameters FSDP-sharded over all ranks (dim 0, padded), experts split
over `ep` ranks and then sharded over `dp_ep`, so a rank holds about 1/world of the float32 master weights
and of AdamW's two moments. With "sharded" gradient accumulation the gradients are sharded too, and one
FSDP unit (a block: its dense part and its own experts) is gathered at a time, the next one prefetched;
with "unsharded" accumulation a rank keeps every dense parameter and its own experts gathered in the
compute dtype through the step, with their full float32 gradients (reduced to shards unit by unit at the
end, so the sharded gradients never add to them). `cpu_offload` moves the sharded parts
to host memory. Activations and the logits follow the micro-batch: `activation_bytes` estimates them on top
of this floor. The engine's KV cache is planned by the RL loop (`leagues.loop.memory`).
"""

import math

import torch

from leagues.model import ModelConfig, Transformer
from leagues.model.moe import GroupedExperts

MASTER_BYTES = 4  # float32 master weights, gradients and AdamW moments
ADAM_MOMENTS = 2


def _shard(shape: torch.Size, ranks: int) -> int:
    """Elements of one rank's FSDP shard of a tensor: dim 0 split in `ranks` padded pieces."""
    if not shape:
        return 1
    return math.ceil(shape[0] / ranks) * math.prod(shape[1:])


def trainer_memory(config: ModelConfig, cfg, world: int, compute_bytes: int = 2) -> dict[str, int]:
    """Bytes per rank, by part: `params` (master shards), `grads`, `optimizer`, `gathered` (parameters in the
    compute dtype while a step runs), `host` (what `cpu_offload` keeps off the device), and `device`, the sum
    of what stays on the device. `cfg` is a `ParallelConfig`."""
    with torch.device("meta"):
        model = Transformer(config)
    ep, dp_ep = cfg.ep, world // cfg.ep
    sharded = dense = local_experts = 0
    blocks: list[int] = []
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if isinstance(module, GroupedExperts):
                local = p.shape[0] // ep
                sharded += _shard(torch.Size([local, *p.shape[1:]]), dp_ep)
                local_experts += local * math.prod(p.shape[1:])
            else:
                sharded += _shard(p.shape, world)
                dense += p.numel()
        if name.count(".") == 1 and name.startswith("layers."):  # one block: the FSDP unit of the step
            experts = sum(p.numel() for m in module.modules() if isinstance(m, GroupedExperts) for p in m.parameters())
            blocks.append(sum(p.numel() for p in module.parameters()) - experts + experts // ep)
    full = dense + local_experts  # a rank's share of the model, gathered
    if cfg.grad_accumulation == "unsharded":  # reduced to shards unit by unit at the end, freed as it goes
        gathered, grads = full * compute_bytes, full * MASTER_BYTES
    else:
        root = full - sum(blocks)  # embeddings, final norm, output layer
        gathered, grads = (root + 2 * max(blocks, default=0)) * compute_bytes, sharded * MASTER_BYTES
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
