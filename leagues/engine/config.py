"""The engine's settings (`EngineConfig`), shared by the engine, its runner and the commands that build one."""

from dataclasses import dataclass

import torch


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    device: str = "auto"
    """"auto" is cuda when available, else cpu."""
    dtype: str = "auto"
    """"auto" is bfloat16 on cuda and float32 on cpu (only used when loading from a path)."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_blocks: int | None = None
    """KV-cache blocks; default: sized from `kv_cache_fraction` (cuda) or `kv_cache_bytes` (cpu)."""
    kv_cache_fraction: float = 0.8
    """Fraction of free GPU memory (after the model loads) given to the KV cache."""
    kv_cache_bytes: int = 256 * 2**20
    """KV-cache size on the CPU."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Token budget of one prefill step (the chunk size of chunked prefill)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); default: the model's max positions."""
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    capture_routes: bool = True
    """Record every token's experts (MoE models) so requests can ask for them."""
    attention_impl: str = "auto"
    moe_impl: str = "auto"
    seed: int = 0
    """Seeds the random seeds of requests that bring none."""
    compile_model: str = "auto"
    """"auto", "true" or "false": the model's blocks, rotary tables and final norm run through `torch.compile`
    (fused norms, rotary, router and MoE glue; attention stays one opaque operator over the paged cache), for
    prefill and decode. "auto" is on with CUDA graphs on CUDA outside deterministic mode (the graphs replay
    the compiled kernels); "true" also compiles on the CPU (tests). Compiling adds to the engine's start
    (once per process and machine: the compiler caches its kernels on disk)."""
    deterministic: bool = False
    """Batch-invariant kernels (`leagues.kernels.batch_invariant`): a request's tokens and logprobs are bitwise
    the same whatever else shares the batch, and equal to the trainer's in deterministic mode."""


def resolve_device_dtype(cfg: EngineConfig) -> tuple[torch.device, torch.dtype]:
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32}.get(cfg.dtype)
    return device, dtype or getattr(torch, cfg.dtype)


def num_kv_blocks(model, cfg: EngineConfig) -> int:
    """KV-cache blocks for `model` (a `Transformer`): `num_blocks`, else a fraction of free GPU memory, else
    `kv_cache_bytes` on the CPU."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    m = model.config
    param = model.embed.weight
    block_bytes = 2 * m.num_layers * cfg.block_size * m.num_kv_heads * m.head_dim * param.element_size()
    if param.is_cuda:
        free, _ = torch.cuda.mem_get_info(param.device)
        return int(free * cfg.kv_cache_fraction) // block_bytes
    return cfg.kv_cache_bytes // block_bytes
