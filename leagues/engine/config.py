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
    """Fraction of free GPU memory (after the model loads) given to the KV cache, at most what `max_num_seqs`
    sequences of `max_model_len` tokens can fill (more could never be used at once)."""
    kv_cache_bytes: int = 256 * 2**20
    """KV-cache size on the CPU."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    """Token budget of one prefill step (the chunk size of chunked prefill)."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); default: the model's max positions."""
    enable_prefix_caching: bool = True
    chunked_prefill: bool = True
    mixed_steps: bool = False
    """Prefill steps also compute the running sequences' next tokens (in the step's token budget left), so a
    request that arrives while others decode (a server's clients, an agent's next turn) does not cost them a
    step. Off by default: a row's logits then come from whichever path computed it (the prefill step's or the
    decode step's kernels), which differ in their last bits, so sampled tokens could depend on when requests
    arrived, and a resumed run would no longer repeat the uninterrupted one exactly. Never in deterministic mode,
    whose bitwise check covers decode rows in the decode path."""
    admit_after_decode_steps: int = 0
    """While sequences decode, a request that arrives waits until this many decode steps have run since the last
    prefill step before its prompt is computed (0: at the next step). Staggered arrivals (a server's clients,
    agents' turns) then share fewer prefill steps, each of which stops the running batch's decode steps and
    their overlap scheduling; each arrival waits up to this many steps longer for its first token. Like batching,
    which requests share a step then depends on arrival timing (the default keeps today's)."""
    cuda_graphs: bool = True
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
    prefill_graph_tokens: int = 2048
    """With `cuda_graphs` on CUDA, outside deterministic mode: the steps that are not plain decodes replay CUDA
    graphs captured for 16, 32, 64, ... tokens, so a request's first step costs its GPU time, not ~20 ms of
    kernel launches (`leagues.engine.prefill_graphs`): fresh prefills (no cached prefix; 16-bit weights) of up to
    this many tokens, and other prefills and mixed steps of up to 512 (and at most this many). At most
    `max_num_batched_tokens`; 0: none. Each size adds a capture to the engine's start."""
    overlap_scheduling: str = "auto"
    """"auto", "true" or "false": decode steps that sample in the step (no truncation, no top logprobs; in
    deterministic mode too) are launched before the previous step's tokens reach the host: their input tokens are
    taken on the device from the previous step's samples, so the host's scheduling and post-processing run while
    the GPU computes. A sequence that stops on eos costs one discarded row. "auto" is on on CUDA (on the CPU a
    step runs when it is launched: there is nothing to overlap); "false": every step waits for its tokens."""
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


def kv_block_bytes(config, cfg: EngineConfig, itemsize: int) -> int:
    """Device bytes of one KV-cache block (keys and values of every layer) of a model of `config` (a
    `ModelConfig`) whose cache holds `itemsize`-byte elements."""
    return 2 * config.num_layers * cfg.block_size * config.num_kv_heads * config.head_dim * itemsize


def max_useful_blocks(config, cfg: EngineConfig) -> int:
    """Blocks that `max_num_seqs` sequences of the longest length fill: a larger cache is never used at once."""
    max_len = cfg.max_model_len or config.max_seq_len
    return cfg.max_num_seqs * -(-max_len // cfg.block_size)


def num_kv_blocks(model, cfg: EngineConfig) -> int:
    """KV-cache blocks for `model` (a `Transformer`): `num_blocks`, else a fraction of free GPU memory, else
    `kv_cache_bytes` on the CPU, at most `max_useful_blocks`."""
    if cfg.num_blocks is not None:
        return cfg.num_blocks
    param = model.embed.weight
    if param.is_cuda:
        free, _ = torch.cuda.mem_get_info(param.device)
        budget = int(free * cfg.kv_cache_fraction)
    else:
        budget = cfg.kv_cache_bytes
    block = kv_block_bytes(model.config, cfg, param.element_size())
    return min(budget // block, max_useful_blocks(model.config, cfg))
