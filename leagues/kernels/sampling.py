"""Sampling arithmetic shared by the engine's sampler and its fused kernel: the temperature, the counter-based
hash RNG, Gumbel-max, and `sample_plain`, one decode step's sampling without truncation (the RL case).

Where it sits: `leagues.engine.sampler` builds on these (truncation, top logprobs, the batch's tensors); the
engine's decode CUDA graphs run `sample_plain` as their last kernel.

Decisions:
- The hash (splitmix64; `engine/sampler.py` documents the stream) is written once for torch int64 tensors
  (wrap-around multiplication, masked shifts) and once in the Triton kernel on uint64, bit for bit the same.
- `sample_plain` on CUDA is two Triton launches: programs over slices of a row's vocabulary (`SAMPLE_SPLIT`), each
  in two passes (the max of the scaled scores, then the sum of exponentials and the argmax of score + Gumbel
  noise, the raw score for greedy rows), then one program a row combining the slices. Ties go to the lowest
  id as `torch.argmax`, so the token is exactly the reference's. Division is IEEE (`div_rn`), as torch's. The
  logprob is `(score - max) - log(sum)`, log_softmax's formula, summed in another order (≈1e-7 apart).
- It is also a `torch.library` operator (`leagues::sample_plain`) so a compiled decode step treats it as
  one opaque call: the compiler neither traces the int64 hash (whose generated CPU code we found wrong)
  nor re-fuses it into something that samples differently from the eager path.
- Elsewhere the pure-torch reference runs; it is exactly the old sampler's arithmetic.

Legend: B rows, V vocabulary.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the reference needs none
    triton = None

_MASK64 = (1 << 64) - 1


def int64_pattern(c: int) -> int:
    """A 64-bit pattern as the signed int64 value torch stores."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = int64_pattern(0x9E3779B97F4A7C15)
_MIX1 = int64_pattern(0xBF58476D1CE4E5B9)
_MIX2 = int64_pattern(0x94D049BB133111EB)


def effective_temperature(temperature_B: torch.Tensor) -> torch.Tensor:
    """The temperature logprobs are taken at: 1 for greedy rows (temperature 0)."""
    return torch.where(temperature_B > 0, temperature_B, torch.ones_like(temperature_B))


def scale_logits(logits_BV: torch.Tensor, temperature_B: torch.Tensor) -> torch.Tensor:
    """`logits.float() / T` per row, float32; the scores both sampling and logprobs start from."""
    return logits_BV.float() / effective_temperature(temperature_B).float()[:, None]


def compute_logprobs(logits_BV: torch.Tensor, temperature_B: torch.Tensor) -> torch.Tensor:
    """The engine's logprob semantics: log_softmax(logits.float() / T), T := 1 where temperature is 0."""
    return scale_logits(logits_BV, temperature_B).log_softmax(dim=-1)


def _shr(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's `>>` is arithmetic: mask off the copied sign bits)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 output mixer on int64 tensors (multiplication wraps modulo 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def hash_uniform(seed_B: torch.Tensor, step_B: torch.Tensor, num_vocab: int) -> torch.Tensor:
    """u[b, v] in the open interval (0, 1), a pure function of (seed_b, step_b, v); float32."""
    key_B = mix64(seed_B ^ mix64(step_B + _GOLDEN))
    offset_V = (torch.arange(num_vocab, device=seed_B.device, dtype=torch.int64) + 1) * _GOLDEN
    bits_BV = mix64(key_B[:, None] + offset_V)
    odd_BV = _shr(bits_BV, 41) * 2 + 1  # top 23 bits as an odd 24-bit integer: exact in float32
    return odd_BV.float() * (2.0**-24)


def gumbel_noise(seed_B: torch.Tensor, step_B: torch.Tensor, num_vocab: int) -> torch.Tensor:
    """Standard Gumbel noise from `hash_uniform`; float32 [B, V]."""
    return -torch.log(-torch.log(hash_uniform(seed_B, step_B, num_vocab)))


def sample_plain_reference(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, seed_B: torch.Tensor, step_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int64, logprobs float32): greedy rows take argmax(logits), the others Gumbel-max over the scaled
    scores; the logprob is the chosen token's under `compute_logprobs`."""
    scores_BV = scale_logits(logits_BV, temperature_B)
    token_ids_B = logits_BV.argmax(dim=-1)
    if bool((temperature_B > 0).any()):
        noisy_BV = scores_BV + gumbel_noise(seed_B, step_B, scores_BV.shape[-1])
        token_ids_B = torch.where(temperature_B > 0, noisy_BV.argmax(dim=-1), token_ids_B)
    logprobs_B = scores_BV.log_softmax(dim=-1).gather(1, token_ids_B[:, None]).squeeze(1)
    return token_ids_B, logprobs_B


if triton is not None:

    @triton.jit
    def _mix64(x):
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB
        return x ^ (x >> 31)

    @triton.jit
    def _sample_plain_kernel(
        logits_ptr, temp_ptr, seed_ptr, step_ptr, part_ptr, best_id_ptr, stride_b, V, SPLIT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Program (b, p): vocabulary slice [p * SPLIT, (p + 1) * SPLIT) of row b, in two passes: its max scaled
        score m, then the sum of exp(score - m) and the argmax of score + Gumbel noise (the raw score for greedy
        rows), ties to the lowest id; partials [m, sum, best noisy score, its score] and the best id."""
        b, p = tl.program_id(0), tl.program_id(1)
        temp = tl.load(temp_ptr + b)
        sampled = temp > 0
        t_eff = tl.where(sampled, temp, 1.0)
        seed = tl.load(seed_ptr + b).to(tl.uint64, bitcast=True)
        step = tl.load(step_ptr + b).to(tl.uint64, bitcast=True)
        key = _mix64(seed ^ _mix64(step + 0x9E3779B97F4A7C15))
        row = logits_ptr + b.to(tl.int64) * stride_b
        offs = tl.arange(0, BLOCK)
        lo = p * SPLIT
        hi = tl.minimum(lo + SPLIT, V)
        m = float("-inf")
        for start in range(lo, hi, BLOCK):
            x = tl.load(row + start + offs, mask=start + offs < hi, other=float("-inf")).to(tl.float32)
            m = tl.maximum(m, tl.max(tl.div_rn(x, t_eff), axis=0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a slice of -inf scores adds nothing (no NaN)
        total = 0.0
        best, best_id, best_score = float("-inf"), lo, float("-inf")
        for start in range(lo, hi, BLOCK):
            ids = start + offs
            valid = ids < hi
            s = tl.div_rn(tl.load(row + ids, mask=valid, other=float("-inf")).to(tl.float32), t_eff)
            total += tl.sum(tl.where(valid, tl.exp(s - m_safe), 0.0), axis=0)
            bits = _mix64(key + (ids + 1).to(tl.uint64) * 0x9E3779B97F4A7C15)
            u = ((bits >> 41) * 2 + 1).to(tl.float32) * 5.960464477539063e-08  # 2**-24
            noisy = tl.where(sampled, s + -tl.log(-tl.log(u)), s)
            noisy = tl.where(valid, noisy, float("-inf"))
            block_best = tl.max(noisy, axis=0)
            block_id = tl.min(tl.where(noisy == block_best, ids, V), axis=0)
            block_score = tl.sum(tl.where(ids == block_id, s, 0.0), axis=0)
            better = block_best > best  # strictly: ties keep the earlier (lower) id
            best_id = tl.where(better, block_id, best_id)
            best_score = tl.where(better, block_score, best_score)
            best = tl.where(better, block_best, best)
        part = part_ptr + (b.to(tl.int64) * tl.num_programs(1) + p) * 4
        tl.store(part, m)
        tl.store(part + 1, total)
        tl.store(part + 2, best)
        tl.store(part + 3, best_score)
        tl.store(best_id_ptr + b.to(tl.int64) * tl.num_programs(1) + p, best_id)

    @triton.jit
    def _sample_plain_combine_kernel(part_ptr, best_id_ptr, token_ptr, logprob_ptr, P, P_PAD: tl.constexpr):
        """Program b: row b's token (the best slice's best id; ties to the earlier slice, so the lower id) and
        its logprob (score - max) - log(sum) from the slices' partials."""
        b = tl.program_id(0)
        offs = tl.arange(0, P_PAD)
        ok = offs < P
        part = part_ptr + (b.to(tl.int64) * P + offs) * 4
        m_P = tl.load(part, mask=ok, other=float("-inf"))
        total_P = tl.load(part + 1, mask=ok, other=0.0)
        best_P = tl.load(part + 2, mask=ok, other=float("-inf"))
        score_P = tl.load(part + 3, mask=ok, other=0.0)
        ids_P = tl.load(best_id_ptr + b.to(tl.int64) * P + offs, mask=ok, other=0)
        m = tl.max(m_P, axis=0)
        total = tl.sum(tl.where(m_P == float("-inf"), 0.0, total_P * tl.exp(m_P - m)), axis=0)
        best = tl.max(best_P, axis=0)
        first = tl.min(tl.where(best_P == best, offs, P_PAD), axis=0)
        token = tl.sum(tl.where(offs == first, ids_P, 0), axis=0)
        score = tl.sum(tl.where(offs == first, score_P, 0.0), axis=0)
        tl.store(token_ptr + b, token.to(tl.int64))
        tl.store(logprob_ptr + b, (score - m) - tl.log(total))


SAMPLE_SPLIT = 4096
"""Vocabulary a program of `sample_plain_triton` takes: a row spreads over ceil(V / 4096) programs (one program a
row of 32,000 took 67 us at 64 rows and 79 us at 256 on an H100: 64-bit hashing and two logs an entry, on as
many SMs as rows)."""


def sample_plain_triton(
    logits_BV: torch.Tensor,
    temperature_B: torch.Tensor,
    seed_B: torch.Tensor,
    step_B: torch.Tensor,
    block: int | None = None,
    split: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_plain_reference` as two launches (CUDA, or the CPU under TRITON_INTERPRET=1): the slices of every
    row, then their combination. `block`: the vocabulary tile (a power of two; default up to 1024); `split`: the
    vocabulary a program takes (a multiple of `block`; default `SAMPLE_SPLIT`)."""
    num_rows, num_vocab = logits_BV.shape
    logits_BV = logits_BV if logits_BV.stride(-1) == 1 else logits_BV.contiguous()
    tokens_B = torch.empty(num_rows, dtype=torch.int64, device=logits_BV.device)
    logprobs_B = torch.empty(num_rows, dtype=torch.float32, device=logits_BV.device)
    if num_rows:
        block = block or min(1024, triton.next_power_of_2(num_vocab))
        split = split or max(block, SAMPLE_SPLIT // block * block)
        if split % block:
            raise ValueError(f"sample_plain_triton: split ({split}) must be a multiple of block ({block})")
        num_splits = triton.cdiv(num_vocab, split)
        part_BP4 = torch.empty(num_rows, num_splits, 4, dtype=torch.float32, device=logits_BV.device)
        best_id_BP = torch.empty(num_rows, num_splits, dtype=torch.int32, device=logits_BV.device)
        _sample_plain_kernel[(num_rows, num_splits)](
            logits_BV, temperature_B.float().contiguous(), seed_B.contiguous(), step_B.contiguous(),
            part_BP4, best_id_BP, logits_BV.stride(0), num_vocab, SPLIT=split, BLOCK=block,
        )  # fmt: skip
        _sample_plain_combine_kernel[(num_rows,)](
            part_BP4, best_id_BP, tokens_B, logprobs_B, num_splits, P_PAD=triton.next_power_of_2(num_splits)
        )
    return tokens_B, logprobs_B


@torch.library.custom_op("leagues::sample_plain", mutates_args=())
def sample_plain(
    logits_BV: torch.Tensor, temperature_B: torch.Tensor, seed_B: torch.Tensor, step_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, logprobs) of every row: the Triton kernel on CUDA, the reference elsewhere."""
    if logits_BV.is_cuda and triton is not None:
        return sample_plain_triton(logits_BV, temperature_B, seed_B, step_B)
    return sample_plain_reference(logits_BV, temperature_B, seed_B, step_B)


@sample_plain.register_fake
def _(logits_BV, temperature_B, seed_B, step_B):
    num_rows = logits_BV.shape[0]
    return logits_BV.new_empty(num_rows, dtype=torch.int64), logits_BV.new_empty(num_rows, dtype=torch.float32)
