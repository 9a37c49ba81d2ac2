"""The transformer that both the rollout engine and the trainer run.

Single-device and free of distribution: parallelism (FSDP2, expert parallel) is applied from outside
by `leagues.parallel`. The core entry is `Transformer.run(ForwardBatch) -> ForwardOutput` over a flat
token axis; attention goes through the batch's backend (packed varlen here, paged KV in the engine).
`forward(input_ids_BT)` is the plain convenience for tests and users.

Routing records are `[T, L, K]` in a compact integer dtype, L counting MoE layers only (in layer
order): `capture_experts=True` returns them, `replay_experts_TLK` feeds them back in.

Legend: B sequences, T tokens, D model dim, V vocab, L MoE layers, K top-k, E experts.
"""

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from leagues.kernels import batch_invariant
from leagues.model.attention import Attention, AttentionBackend, PackedSeqs, compiler_boundaries
from leagues.model.config import ModelConfig
from leagues.model.layers import GatedMLP, InvariantLinear, RMSNorm, RotaryEmbedding
from leagues.model.moe import GroupedExperts, MoE, Router


@dataclass(slots=True)
class ForwardBatch:
    input_ids_T: torch.Tensor
    positions_T: torch.Tensor
    attention: AttentionBackend
    replay_experts_TLK: torch.Tensor | None = None
    """Use these experts instead of the router's top-k (routing replay)."""
    capture_experts: bool = False
    capture_router_logits: bool = False
    compute_logits: bool = True
    """False returns only the final hidden states (the trainer computes logprobs in vocab chunks)."""

    @classmethod
    def packed(cls, input_ids_T: torch.Tensor, lengths: list[int], **kwargs) -> "ForwardBatch":
        if sum(lengths) != input_ids_T.shape[0]:
            raise ValueError(f"lengths sum to {sum(lengths)} but input_ids has {input_ids_T.shape[0]} tokens")
        seqs = PackedSeqs.from_lengths(lengths, device=input_ids_T.device)
        return cls(input_ids_T=input_ids_T, positions_T=seqs.positions(), attention=seqs, **kwargs)

    def padded(self, pad: int) -> "ForwardBatch":
        """This packed batch with `pad` more tokens (token 0) as sequences of their own, which attend only to
        themselves and route on their own (replayed routes give them the first K experts): the other tokens'
        results are what they would be without them. No padding sequence is longer than the longest real one, so
        the length bound a compiled graph is specialised on stays the batch's."""
        seqs, device = self.attention, self.input_ids_T.device
        longest = max(seqs.lengths)
        pieces = [longest] * (pad // longest) + ([pad % longest] if pad % longest else [])
        padded = PackedSeqs.from_lengths([*seqs.lengths, *pieces], device=device, impl=seqs.impl)
        replay = self.replay_experts_TLK
        if replay is not None:
            fill = torch.arange(replay.shape[2], dtype=replay.dtype, device=replay.device)
            replay = torch.cat([replay, fill.expand(pad, replay.shape[1], -1)])
        return replace(
            self,
            input_ids_T=torch.cat([self.input_ids_T, self.input_ids_T.new_zeros(pad)]),
            positions_T=torch.cat([self.positions_T, self.positions_T.new_zeros(pad)]),  # within any rotary table
            attention=padded,
            replay_experts_TLK=replay,
        )


@dataclass(slots=True)
class ForwardOutput:
    hidden_TD: torch.Tensor
    logits_TV: torch.Tensor | None = None
    routed_experts_TLK: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    """One [T, E] tensor per MoE layer, for auxiliary losses and metrics."""


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = layer_idx in cfg.moe_layers
        if self.is_moe:
            self.moe = MoE(cfg)
        else:
            self.mlp = GatedMLP(cfg.dim, cfg.ffn_dim, bias=cfg.mlp_bias)

    def forward(self, x_TD, rope, backend, replay_ids_TK=None, pending=None):
        """(residual stream, this block's output not yet added to it, routing). `pending` is the previous block's
        output (the MoE's unsummed pair outputs [T, K, D] where its kernels hand them over): adding it here puts
        the block boundary's residual add in the same kernel as this block's first norm (`add_norm`; one launch
        fewer a layer in a decode step). Under autograd the add stays in this block (pending None): a checkpointed
        block keeps its inputs, and one tensor crossing the boundary is half the memory of two. Deterministic mode
        (`set_batch_invariant`) adds and normalises in one launch (`batch_invariant.add_rms_norm`) and leaves the
        boundary's add to the next block under autograd too; without gradients that launch also sums the MoE's
        pairs, which the trainer sums first with the same float32 adds in the same order, so both get the same
        values."""
        if self.attn_norm.invariant:
            return self._invariant_forward(x_TD, rope, backend, replay_ids_TK, pending)
        x_TD, h_TD = add_norm(x_TD, pending, self.attn_norm)
        x_TD = x_TD + self.attn(h_TD, rope, backend)
        h_TD = self.mlp_norm(x_TD)
        if self.is_moe:
            out, routing = self.moe(h_TD, replay_ids_TK, sum_pairs=False)
        else:
            out, routing = self.mlp(h_TD), None
        if torch.is_grad_enabled():
            return add_pending(x_TD, out), None, routing
        return x_TD, out, routing

    def _invariant_forward(self, x_TD, rope, backend, replay_ids_TK, pending):
        attn_norm, mlp_norm = self.attn_norm, self.mlp_norm
        x_TD, h_TD = batch_invariant.add_rms_norm(x_TD, pending, attn_norm.weight, attn_norm.eps)
        attn_TD = self.attn(h_TD, rope, backend)
        x_TD, h_TD = batch_invariant.add_rms_norm(x_TD, attn_TD, mlp_norm.weight, mlp_norm.eps)
        # without gradients on CUDA the MoE's pair outputs go over unsummed: the next add-and-norm launch sums them
        out, routing = self.moe(h_TD, replay_ids_TK, sum_pairs=False) if self.is_moe else (self.mlp(h_TD), None)
        return x_TD, out, routing


def add_norm(x_TD: torch.Tensor, pending: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + pending, norm of it). The tiled MoE's pair outputs [T, K, D] on CUDA take one launch for the top-k
    sum, the add and the norm (`batch_invariant.add_pairs_rms_norm`: the compiler would reduce over K and over D
    in two kernels); otherwise the model's ops, which the compiler fuses."""
    if pending is not None and pending.dim() == 3 and batch_invariant.uses_triton(x_TD):
        return batch_invariant.add_pairs_rms_norm(x_TD, pending, norm.weight, norm.eps)
    x_TD = add_pending(x_TD, pending)
    return x_TD, norm(x_TD)


def add_pending(x_TD: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """The residual add of a block's output: [T, D], or the MoE's per-pair outputs [T, K, D] in float32, summed
    over K and rounded to x's dtype first (the numbers the MoE's own sum gives)."""
    if pending is None:
        return x_TD
    if pending.dim() == 3:
        pending = pending.sum(1).to(x_TD.dtype)
    return x_TD + pending


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.invariant_len = 0
        """Deterministic mode: keys are padded to this length (0: off; see `set_batch_invariant`)."""
        self.pad_to = 1
        """Packed batches run padded up to a size bucket of this unit (`padded_size`, `compile_blocks`; 1: not
        padded); outputs cover the batch's own tokens only."""

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] for B equal-length sequences, causal within each."""
        num_seqs, seq_len = input_ids_BT.shape
        batch = ForwardBatch.packed(input_ids_BT.flatten(), [seq_len] * num_seqs)
        return self.run(batch).logits_TV.view(num_seqs, seq_len, -1)

    def run(self, batch: ForwardBatch) -> ForwardOutput:
        if self.invariant_len:  # both attention backends (packed, paged) honour it
            batch.attention.invariant_len = self.invariant_len
        num_tokens = batch.input_ids_T.shape[0]
        packed = isinstance(batch.attention, PackedSeqs) and not self.invariant_len and self.pad_to > 1
        pad = padded_size(num_tokens, self.pad_to) - num_tokens if packed else 0
        if pad:
            batch = batch.padded(pad)
        x_TD = self.embed(batch.input_ids_T)
        rope = self.rope(batch.positions_T, x_TD.dtype)
        replay = self._check_replay(batch.replay_experts_TLK, x_TD.shape[0])
        routes, router_logits, pending = [], [], None
        for block in self.layers:
            replay_ids_TK = replay[:, len(routes)] if replay is not None and block.is_moe else None
            x_TD, pending, routing = block(x_TD, rope, batch.attention, replay_ids_TK, pending)
            if routing is not None:
                routes.append(routing.expert_ids_TK)
                router_logits.append(routing.logits_TE)
        if self.norm.invariant:  # deterministic mode (never padded): the last add and the final norm in one launch
            hidden_TD = batch_invariant.add_rms_norm(x_TD, pending, self.norm.weight, self.norm.eps)[1]
        elif not pad:
            hidden_TD = add_norm(x_TD, pending, self.norm)[1]
        else:  # the padding's rows leave here: nothing downstream sees them
            x_TD = add_pending(x_TD, pending)[:num_tokens]
            routes = [ids_TK[:num_tokens] for ids_TK in routes]
            router_logits = [logits_TE[:num_tokens] for logits_TE in router_logits]
            hidden_TD = self.norm(x_TD)
        out = ForwardOutput(hidden_TD=hidden_TD)
        if batch.compute_logits:
            out.logits_TV = self.logits(hidden_TD)
        if batch.capture_experts and routes:
            out.routed_experts_TLK = torch.stack(routes, dim=1).to(self.config.expert_id_dtype())
        if batch.capture_router_logits:
            out.router_logits = router_logits
        return out

    def logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        weight_VD = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return batch_invariant.linear(hidden_TD, weight_VD) if self.invariant_len else hidden_TD @ weight_VD.T

    def _check_replay(self, replay_TLK: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
        if replay_TLK is None:
            return None
        expected = (num_tokens, self.config.num_moe_layers, self.config.top_k)
        if tuple(replay_TLK.shape) != expected:
            raise ValueError(f"replay_experts_TLK has shape {tuple(replay_TLK.shape)}, expected {expected}")
        if replay_TLK.numel() and (int(replay_TLK.min()) < 0 or int(replay_TLK.max()) >= self.config.num_experts):
            raise ValueError(f"replay_experts_TLK holds expert ids outside 0..{self.config.num_experts - 1}")
        return replay_TLK

    def set_batch_invariant(self) -> None:
        """Deterministic mode: every product, norm, attention and MoE computed batch-invariantly
        (`leagues.kernels.batch_invariant`: Triton on CUDA, torch references elsewhere), so a token's logits
        are bitwise the same in a packed training batch, a prefill or a decode step, whatever else shares the
        batch."""
        self.invariant_len = self.config.max_seq_len
        for module in self.modules():
            if type(module) is nn.Linear:
                module.__class__ = InvariantLinear
            elif isinstance(module, (Router, RMSNorm)):
                module.invariant = True
        self.set_moe_impl("invariant")

    def set_moe_impl(self, impl: str) -> None:
        """Choose the expert kernel: "auto", "grouped" or "reference"."""
        if impl not in ("auto", "grouped", "reference", "invariant"):
            raise ValueError(f"moe impl must be auto, grouped, reference or invariant, got {impl!r}")
        for module in self.modules():
            if isinstance(module, GroupedExperts):
                module.impl = impl

    def fuse_qkv(self, on: bool = True) -> None:
        """One q/k/v projection per layer (`Attention.fuse_qkv`), batch-invariant in deterministic mode.
        `on=False` drops the fused weights (before parameters move)."""
        for block in self.layers:
            if not on:
                block.attn.wqkv = None
            elif type(block.attn.wq) in (nn.Linear, InvariantLinear):
                block.attn.fuse_qkv()

    def compile_blocks(self, pad_to: int = 1, **compile_kwargs) -> None:
        """`torch.compile` each block in place (fuses norms, rotary and the MoE permutation glue).

        Blocks share one graph (parameters are graph inputs), so compiling costs one trace per
        distinct block kind and size, not per layer. `pad_to`: packed batches run padded up to a size bucket
        of this unit (`padded_size`), so blocks compiled for static sizes (`dynamic=False`) see only a few.
        """
        if pad_to < 1:
            raise ValueError(f"pad_to must be >= 1, got {pad_to}")
        self.pad_to = pad_to
        compiler_boundaries()
        raise_recompile_limit()
        for block in self.layers:
            block.compile(**compile_kwargs)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Deterministic random initialisation (normal(0, std) matrices, unit norms, zero biases)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def padded_size(num_tokens: int, unit: int) -> int:
    """The size bucket a packed batch of `num_tokens` runs at: the least of unit x (1, 2, 3, 4, 6, 8, 12, 16, ...)
    that holds it. Buckets grow geometrically, so a trainer whose batches vary from one unit to 2^k units compiles
    at most 2k + 1 sizes, each padded by less than half its tokens (a new size costs a compile of seconds)."""
    units = -(-num_tokens // unit)
    if units <= 2:
        return units * unit
    power = 1 << (units - 1).bit_length()  # the least power of two >= units
    return (power * 3 // 4 if units <= power * 3 // 4 else power) * unit


def raise_recompile_limit() -> None:
    """Every compiled size must run compiled code, never fall back to eager at dynamo's recompile limit (its
    settings are per thread: call it in the thread that runs the compiled code)."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
