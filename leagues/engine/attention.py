"""The engine's attention backend: keys and values live in a paged cache.

`PagedAttention` is what the runner hands to `Transformer.run` as the batch's attention backend (the
seam in `leagues.model.attention`). For each layer it writes the step's new keys and values into
their cache slots (in a decode step on CUDA, the decode kernel itself does), then attends:
- decode steps (one query per sequence): the paged decode kernel (`leagues.kernels.paged_attention`,
  Triton on CUDA, the torch reference elsewhere);
- prefill steps on CUDA: FlashAttention varlen over the fresh keys when no sequence has a cached
  prefix, else over each sequence's cached keys gathered contiguously (prefix hits, later chunks);
- prefill steps elsewhere: the padded batched torch path over the paged cache (`impl="reference"`: the
  per-sequence reference).

Compiled blocks (`leagues.engine.runner`) see attention only as one opaque operator,
`leagues::paged_attend(q, k, v)`: the compiler never traces the cache, so it can neither copy nor re-layout
it. The operator runs `attend` of the backend made active with `active_backend(...)` on the calling thread
(a CUDA graph captures the kernels it launches, reading the backend's persistent buffers).

Legend: T tokens in the step, B sequences, H query heads, G kv heads, A head dim, N blocks,
S block size, M max blocks per sequence, L layers.
"""

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from leagues.kernels import invariant_attention
from leagues.kernels.paged_attention import (
    gather_kv,
    paged_attention_padded,
    paged_decode,
    paged_prefill_reference,
    write_kv,
)
from leagues.model.attention import varlen_causal, varlen_function


@dataclass(slots=True)
class PagedAttention:
    kv_cache_2LNSGA: torch.Tensor
    slots_T: torch.Tensor
    """Flat cache slot (block * S + row) of every token of the step."""
    block_tables_BM: torch.Tensor
    context_lens_B: torch.Tensor
    """Tokens of each sequence in the cache once this step's are written."""
    cu_seqlens_q_B1: torch.Tensor
    max_q: int
    max_k: int
    is_decode: bool
    fresh: bool
    """No sequence has a cached prefix: every query chunk starts at position 0."""
    impl: str = "auto"
    """"auto", "triton" or "reference" for the decode kernel; "reference" also forces the prefill reference."""
    split_tokens: int | None = None
    """Decode on CUDA: split-K with this many keys a split (`paged_attention.decode_split_tokens`); None: one pass."""
    invariant_len: int = 0
    """Deterministic mode (set by the model): batch-invariant attention with keys padded to this length."""
    invariant_tiles: tuple | None = None
    """Deterministic mode on CUDA: the kernel's tiles of this step, built by the first layer."""
    rows_are_sequences: bool = True
    """Decode: each row is a sequence of its own, whose new key and value only that row reads, so the decode
    kernel writes them itself. False for ragged steps (a sequence's rows read each other's: `write_kv` first)."""
    keys: tuple[torch.Tensor, torch.Tensor] | None = None
    """Prefill over cached keys: `key_slots` of the step (every key's slot, cu_seqlens_k), built once for all
    layers (None: each layer builds them, reading their count back)."""

    def attend(self, layer_idx: int, q_THA: torch.Tensor, k_TGA: torch.Tensor, v_TGA: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.kv_cache_2LNSGA[0, layer_idx], self.kv_cache_2LNSGA[1, layer_idx]
        scale = q_THA.shape[-1] ** -0.5
        new_kv = (k_TGA, v_TGA, self.slots_T)
        if self.is_decode and not self.invariant_len:
            options = {} if self.split_tokens is None else {"split_tokens": self.split_tokens}
            if not self.rows_are_sequences:
                write_kv(k_cache, v_cache, *new_kv)
                new_kv = None
            tables, lens = self.block_tables_BM, self.context_lens_B
            return paged_decode(q_THA, k_cache, v_cache, tables, lens, scale, self.impl, new_kv=new_kv, **options)
        group = q_THA.shape[1] // k_TGA.shape[1]
        if (
            self.invariant_len
            and q_THA.is_cuda
            and self.is_decode
            and self.rows_are_sequences
            and group <= invariant_attention.ATT_BLOCK_M
        ):
            return self._invariant(q_THA, k_cache, v_cache, scale, new_kv)  # the kernel writes the new keys
        write_kv(k_cache, v_cache, *new_kv)
        if self.invariant_len:
            return self._invariant(q_THA, k_cache, v_cache, scale)
        flash_dtype = q_THA.dtype in (torch.float16, torch.bfloat16)  # FlashAttention has no float32 kernel
        if q_THA.is_cuda and flash_dtype and self.impl != "reference" and varlen_function() is not None:
            if self.fresh:
                cu, n = self.cu_seqlens_q_B1, self.max_q
                return varlen_causal(q_THA, k_TGA, v_TGA, cu, cu, n, n)
            k_SGA, v_SGA, cu_k = gather_kv(k_cache, v_cache, self.block_tables_BM, self.context_lens_B, self.keys)
            return varlen_causal(q_THA, k_SGA, v_SGA, self.cu_seqlens_q_B1, cu_k, self.max_q, self.max_k)
        prefill = paged_prefill_reference if self.impl == "reference" else paged_attention_padded
        return prefill(q_THA, k_cache, v_cache, self.block_tables_BM, self.cu_seqlens_q_B1, self.context_lens_B, scale)

    def _invariant(self, q_THA, k_cache, v_cache, scale: float, new_kv=None) -> torch.Tensor:
        """Each sequence's queries over its cached keys with `invariant_attention.attention`: the same per-token
        arithmetic as the trainer's packed forward in deterministic mode. `new_kv` (CUDA decode steps): the
        kernel stores the step's keys and values itself."""
        if q_THA.is_cuda:
            if self.invariant_tiles is None:
                group = q_THA.shape[1] // k_cache.shape[2]
                self.invariant_tiles = invariant_attention.attention_tiles(self.cu_seqlens_q_B1, q_THA.shape[0], group)
            return invariant_attention.paged_attention(
                q_THA,
                k_cache,
                v_cache,
                self.cu_seqlens_q_B1,
                self.context_lens_B,
                self.block_tables_BM,
                scale,
                self.invariant_tiles,
                new_kv,
            )
        k_SGA, v_SGA, cu_k = gather_kv(k_cache, v_cache, self.block_tables_BM, self.context_lens_B, self.keys)
        cu_q, cu_k = self.cu_seqlens_q_B1.tolist(), cu_k.tolist()
        parts = []
        for b in range(len(cu_k) - 1):
            num_q, num_k = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
            pos_Q = torch.arange(num_k - num_q, num_k, device=q_THA.device)
            k, v = k_SGA[cu_k[b] : cu_k[b + 1]], v_SGA[cu_k[b] : cu_k[b + 1]]
            parts.append(
                invariant_attention.attention(q_THA[cu_q[b] : cu_q[b + 1]], k, v, pos_Q, self.invariant_len, scale)
            )
        return torch.cat(parts, dim=0)


_active = threading.local()


@contextmanager
def active_backend(backend: PagedAttention):
    """Within the block, `leagues::paged_attend` on this thread attends with `backend`, layer by layer: the
    n-th call of the block is layer n (the compiled blocks share one graph, so no layer index is traced)."""
    previous = getattr(_active, "state", None)
    _active.state = [backend, 0]
    try:
        yield backend
    finally:
        _active.state = previous


@torch.library.custom_op("leagues::paged_attend", mutates_args=())
def paged_attend(q_THA: torch.Tensor, k_TGA: torch.Tensor, v_TGA: torch.Tensor) -> torch.Tensor:
    """The active backend's `attend` (cache write and attention) of the next layer, as one operator the compiler
    does not trace. Declared free of mutation on purpose: the cache is no argument, and nothing else in the
    compiled graph reads it, so no ordering is lost."""
    state = getattr(_active, "state", None)
    if state is None:
        raise RuntimeError("leagues::paged_attend called outside `active_backend(...)`")
    backend, layer_idx = state
    state[1] += 1
    return backend.attend(layer_idx, q_THA, k_TGA, v_TGA)


@paged_attend.register_fake
def _(q_THA, k_TGA, v_TGA):
    return torch.empty_like(q_THA)


class OpaqueAttention:
    """The attention backend of compiled blocks: each layer calls `leagues::paged_attend`, which attends with
    the backend made active by `active_backend` (layers must run in order, once each, as a forward does)."""

    invariant_len = 0

    def attend(self, layer_idx: int, q_THA, k_TGA, v_TGA):
        return torch.ops.leagues.paged_attend(q_THA, k_TGA, v_TGA)
