"""Paged attention: references against dense attention, the Triton decode kernel against the reference.

Caches start as NaN and only the valid tokens are written, through shuffled (non-contiguous) block tables,
so any read outside a sequence's tokens shows up as NaN. On a machine without CUDA the Triton kernel runs
under the interpreter: TRITON_INTERPRET=1 must be set before triton is first imported, which this module
does; where another test module imported triton first (a full-suite run), the kernel tests rerun in a fresh
process instead. Shapes stay small because the interpreter is slow.

Legend: B sequences, H query heads, G kv heads, A head dim, N cache blocks, S block size, M max blocks per
sequence, T tokens (packed), K keys of one sequence, Q queries of one sequence.
"""

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from leagues.kernels import num_sms  # noqa: E402
from leagues.kernels import paged_attention as pa  # noqa: E402

triton = pa.triton  # None where triton is not installed

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIXED_LENS = (1, 3, 4, 9, 14)  # with S = 4: one token, S - 1, S, several blocks with partial last blocks


@dataclass
class PagedCase:
    k_cache_NSGA: torch.Tensor
    v_cache_NSGA: torch.Tensor
    block_tables_BM: torch.Tensor
    context_lens_B: torch.Tensor
    dense_k: list[torch.Tensor]  # per sequence [K, G, A]
    dense_v: list[torch.Tensor]


def make_case(lens, block_size=4, num_kv_heads=2, head_dim=16, dtype=torch.float32, seed=0) -> PagedCase:
    """Random per-sequence K/V scattered token by token into shuffled blocks of a NaN-filled cache."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks, max_blocks = sum(blocks_per_seq) + 3, max(blocks_per_seq) + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache_NSGA, v_cache_NSGA = (
        torch.full(shape, float("nan"), dtype=dtype),
        torch.full(shape, float("nan"), dtype=dtype),
    )
    block_tables_BM = torch.zeros(len(lens), max_blocks, dtype=torch.int32)
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    dense_k, dense_v = [], []
    for b, n in enumerate(lens):
        for m in range(blocks_per_seq[b]):
            block_tables_BM[b, m] = free_blocks.pop()
        k_KGA, v_KGA = (torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
        for j in range(n):
            block, row = block_tables_BM[b, j // block_size], j % block_size
            k_cache_NSGA[block, row], v_cache_NSGA[block, row] = k_KGA[j], v_KGA[j]
        dense_k.append(k_KGA)
        dense_v.append(v_KGA)
    lens_B = torch.tensor(lens, dtype=torch.int32)
    to = (k_cache_NSGA, v_cache_NSGA, block_tables_BM, lens_B)
    return PagedCase(*(t.to(DEVICE) for t in to), [k.to(DEVICE) for k in dense_k], [v.to(DEVICE) for v in dense_v])


def dense_attention(q_QHA, k_KGA, v_KGA, scale) -> torch.Tensor:
    """SDPA over contiguous K/V with a bottom-right causal mask (queries are the last Q of K tokens)."""
    num_q, num_k = len(q_QHA), len(k_KGA)
    group = q_QHA.shape[1] // k_KGA.shape[1]
    mask_QK = torch.ones(num_q, num_k, dtype=torch.bool, device=q_QHA.device).tril(diagonal=num_k - num_q)
    q_HQA, k_HKA, v_HKA = (
        x.transpose(0, 1) for x in (q_QHA, k_KGA.repeat_interleave(group, 1), v_KGA.repeat_interleave(group, 1))
    )
    return F.scaled_dot_product_attention(q_HQA, k_HKA, v_HKA, attn_mask=mask_QK, scale=scale).transpose(0, 1)


def random_q(num_tokens, num_heads, head_dim, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(num_tokens, num_heads, head_dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def kernel_args(case: PagedCase):
    return case.k_cache_NSGA, case.v_cache_NSGA, case.block_tables_BM, case.context_lens_B


# ---------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_reference_matches_dense(group, head_dim):
    case = make_case(MIXED_LENS, head_dim=head_dim)
    q_BHA = random_q(len(MIXED_LENS), 2 * group, head_dim)
    o_BHA = pa.paged_decode_reference(q_BHA, *kernel_args(case), scale=head_dim**-0.5)
    for b in range(len(MIXED_LENS)):
        want_1HA = dense_attention(q_BHA[b : b + 1], case.dense_k[b], case.dense_v[b], head_dim**-0.5)
        torch.testing.assert_close(o_BHA[b : b + 1], want_1HA, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_reference_matches_dense_causal(group):
    lens, q_lens = (5, 9, 4, 7), (5, 3, 1, 7)  # whole prompt, cached prefix, one token (decode), whole prompt
    case = make_case(lens)
    cu_seqlens_q_B1 = F.pad(torch.tensor(q_lens).cumsum(0), (1, 0)).to(DEVICE, torch.int32)
    q_THA = random_q(sum(q_lens), 2 * group, 16)
    o_THA = pa.paged_prefill_reference(q_THA, *kernel_args(case)[:3], cu_seqlens_q_B1, case.context_lens_B, 0.25)
    for b, (start, end) in enumerate(zip(cu_seqlens_q_B1[:-1].tolist(), cu_seqlens_q_B1[1:].tolist(), strict=True)):
        want_QHA = dense_attention(q_THA[start:end], case.dense_k[b], case.dense_v[b], 0.25)
        torch.testing.assert_close(o_THA[start:end], want_QHA, atol=1e-5, rtol=1e-5)


def test_prefill_with_one_query_each_equals_decode():
    case = make_case(MIXED_LENS)
    q_BHA = random_q(len(MIXED_LENS), 4, 16)
    cu_seqlens_q_B1 = torch.arange(len(MIXED_LENS) + 1, dtype=torch.int32, device=DEVICE)
    prefill = pa.paged_prefill_reference(q_BHA, *kernel_args(case)[:3], cu_seqlens_q_B1, case.context_lens_B, 0.3)
    torch.testing.assert_close(prefill, pa.paged_decode_reference(q_BHA, *kernel_args(case), 0.3), atol=0, rtol=0)


def test_gather_kv_and_write_kv_round_trip():
    case = make_case(MIXED_LENS)
    k_TGA, v_TGA, cu_seqlens_k_B1 = pa.gather_kv(*kernel_args(case))
    assert cu_seqlens_k_B1.dtype == torch.int32
    assert cu_seqlens_k_B1.tolist() == [0, *torch.tensor(MIXED_LENS).cumsum(0).tolist()]
    torch.testing.assert_close(k_TGA, torch.cat(case.dense_k), atol=0, rtol=0)
    torch.testing.assert_close(v_TGA, torch.cat(case.dense_v), atol=0, rtol=0)

    # write the packed tokens into a fresh cache at the same slots, then gather them back
    block_size, num_seqs = case.k_cache_NSGA.shape[1], len(MIXED_LENS)
    pos_T = torch.cat([torch.arange(n) for n in MIXED_LENS]).to(DEVICE)
    seq_T = torch.repeat_interleave(torch.arange(num_seqs), torch.tensor(MIXED_LENS)).to(DEVICE)
    slots_T = case.block_tables_BM[seq_T, pos_T // block_size].long() * block_size + pos_T % block_size
    k_new, v_new = torch.full_like(case.k_cache_NSGA, float("nan")), torch.full_like(case.v_cache_NSGA, float("nan"))
    pa.write_kv(k_new, v_new, k_TGA, v_TGA, slots_T)
    written = ~k_new.isnan().all(-1).all(-1)
    assert int(written.sum()) == sum(MIXED_LENS)
    k_back, v_back, _ = pa.gather_kv(k_new, v_new, case.block_tables_BM, case.context_lens_B)
    torch.testing.assert_close(k_back, k_TGA, atol=0, rtol=0)
    torch.testing.assert_close(v_back, v_TGA, atol=0, rtol=0)


def test_dispatch():
    case = make_case(MIXED_LENS)
    q_BHA = random_q(len(MIXED_LENS), 4, 16)
    want = pa.paged_decode_reference(q_BHA, *kernel_args(case), 0.3)
    got = pa.paged_decode(q_BHA, *kernel_args(case), 0.3, impl="reference")
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    if DEVICE == "cpu":  # "auto" takes the padded path there: the same sums in another order (last-bit differences)
        torch.testing.assert_close(pa.paged_decode(q_BHA, *kernel_args(case), 0.3), want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        pa.paged_decode(q_BHA, *kernel_args(case), 0.3, impl="flash")


# ---------------------------------------------------------------------------------------------- triton kernel


def _can_interpret_here() -> bool:
    """On CPU the kernels run only if triton (its own `tl` helpers too) was imported after TRITON_INTERPRET=1."""
    from triton.runtime.interpreter import InterpretedFunction

    return all(isinstance(fn, InterpretedFunction) for fn in (pa._decode_kernel, triton.language.standard.cdiv))


@pytest.fixture(scope="module")
def kernels():
    """The kernel module, its Triton kernels runnable on this machine (interpreted without CUDA)."""
    if triton is None:
        pytest.skip("triton is not installed (Linux only)")
    if DEVICE == "cpu":
        if not _can_interpret_here():
            pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_in_fresh_process runs these")
        from triton.runtime import interpreter

        _fix_interpreter_index_for_numpy_24(interpreter)
    return pa


def _fix_interpreter_index_for_numpy_24(interpreter) -> None:
    """triton 3.6's interpreter calls int() on a 1-element array for loop bounds, which numpy >= 2.4 refuses
    (triton-lang/triton#9171, fixed upstream by #9172); patch `__index__` the way the fix does."""
    original = interpreter._patch_lang_tensor
    if getattr(original, "leagues_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.leagues_fixed = True
    interpreter._patch_lang_tensor = patched


@pytest.mark.parametrize(
    ("head_dim", "group", "block_size", "options"),
    [
        (16, 1, 4, {"block_n": 16}),  # a tile spans four blocks
        (16, 2, 16, {"block_n": 16}),  # tile == block
        (64, 4, 4, {"block_n": 16}),
        (64, 2, 8, {"block_n": 32, "split_tokens": 32}),  # split-K, one tile per split
        (16, 4, 4, {"block_n": 16, "split_tokens": 16}),  # split-K with empty splits for short sequences
    ],
)
def test_triton_decode_matches_reference(kernels, head_dim, group, block_size, options):
    lens = (1, block_size - 1, block_size, 2 * block_size + 1, 3 * block_size + 2)
    case = make_case(lens, block_size=block_size, head_dim=head_dim)
    q_BHA = random_q(len(lens), 2 * group, head_dim)
    want = kernels.paged_decode_reference(q_BHA, *kernel_args(case), head_dim**-0.5)
    got = kernels.paged_decode(q_BHA, *kernel_args(case), head_dim**-0.5, impl="triton", **options)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{"block_n": 16}, {"block_n": 16, "split_tokens": 16}])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_triton_decode_writes_the_new_keys_it_reads(kernels, options, impl):
    """`new_kv`: each sequence's last key and value arrive with the query (their slots NaN in the cache); the
    decode stores them (the Triton kernel itself, in the program whose split holds them) and attends over them:
    the cache and the output are those of the separate write and the reference decode."""
    lens, block_size = (1, 3, 4, 9, 14), 4
    case = make_case(lens, block_size=block_size)
    tables = case.block_tables_BM.cpu()
    slots_B = torch.tensor([int(tables[b, (n - 1) // block_size]) * block_size + (n - 1) % block_size
                            for b, n in enumerate(lens)], device=DEVICE)  # fmt: skip
    k_rows, v_rows = (c.view(-1, *c.shape[2:]) for c in (case.k_cache_NSGA, case.v_cache_NSGA))
    k_BGA, v_BGA = k_rows[slots_B].clone(), v_rows[slots_B].clone()
    want_cache = (case.k_cache_NSGA.clone(), case.v_cache_NSGA.clone())
    q_BHA = random_q(len(lens), 4, 16)
    want = kernels.paged_decode_reference(q_BHA, *kernel_args(case), 0.25)
    k_rows[slots_B], v_rows[slots_B] = float("nan"), float("nan")
    got = kernels.paged_decode(q_BHA, *kernel_args(case), 0.25, impl=impl, new_kv=(k_BGA, v_BGA, slots_B), **(
        options if impl == "triton" else {}))  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for cache, wanted in zip((case.k_cache_NSGA, case.v_cache_NSGA), want_cache, strict=True):
        torch.testing.assert_close(cache, wanted, equal_nan=True, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="the triton 3.6 interpreter computes bf16 tl.dot wrong (numpy has no bf16)")
def test_triton_decode_bf16(kernels):
    case = make_case(MIXED_LENS, dtype=torch.bfloat16)
    q_BHA = random_q(len(MIXED_LENS), 4, 16, dtype=torch.bfloat16)
    want = kernels.paged_decode_reference(q_BHA, *kernel_args(case), 0.25)
    got = kernels.paged_decode_triton(q_BHA, *kernel_args(case), 0.25, block_n=16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need CUDA")
def test_triton_decode_replays_in_cuda_graph(kernels):
    """Captured once, replayed after the batch's lengths and query change: no host sync, no data-shaped buffers."""
    case = make_case(MIXED_LENS, dtype=torch.bfloat16)
    q_BHA = random_q(len(MIXED_LENS), 4, 16, dtype=torch.bfloat16)
    for options in ({}, {"block_n": 16, "split_tokens": 16}):
        kernels.paged_decode_triton(q_BHA, *kernel_args(case), 0.25, **options)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_BHA = kernels.paged_decode_triton(q_BHA, *kernel_args(case), 0.25, **options)
        q_BHA.copy_(random_q(len(MIXED_LENS), 4, 16, dtype=torch.bfloat16, seed=7))
        case.context_lens_B.copy_(torch.tensor([1, 2, 4, 5, 13], dtype=torch.int32))  # only cached tokens
        graph.replay()
        want = kernels.paged_decode_reference(q_BHA, *kernel_args(case), 0.25)
        torch.testing.assert_close(o_BHA, want, atol=2e-2, rtol=2e-2)
        case.context_lens_B.copy_(torch.tensor(MIXED_LENS, dtype=torch.int32))


def test_triton_in_fresh_process():
    """Where this process imported triton uninterpreted, run the kernel tests in one where it is interpreted."""
    if triton is None or DEVICE != "cpu" or _can_interpret_here():
        pytest.skip("the kernel tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tests = "triton_decode or write_kernel"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests, __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_padded_batched_path_equals_reference_for_prefill_chunks():
    """The CPU fast path over mixed query and cache lengths (later chunks, prefix hits) against the loop."""
    lens = [5, 1, 9, 4, 13]
    q_lens = [2, 1, 9, 3, 4]
    case = make_case(lens)
    q_THA = random_q(sum(q_lens), 4, 16)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32).to(DEVICE)
    args = (case.k_cache_NSGA, case.v_cache_NSGA, case.block_tables_BM, cu_q, case.context_lens_B, 0.25)
    want = pa.paged_prefill_reference(q_THA, *args)
    torch.testing.assert_close(pa.paged_attention_padded(q_THA, *args), want, atol=1e-6, rtol=1e-6)


def test_split_size_fills_the_sms_only_when_one_pass_leaves_them_idle():
    from leagues.kernels.paged_attention import decode_split_tokens

    assert decode_split_tokens(64, 4, 2048, 132) is None  # 256 programs fill 132 SMs
    assert decode_split_tokens(1, 4, 64, 132) is None  # the keys fit one split
    assert decode_split_tokens(1, 4, 2048, 132) == 64  # 33 splits wanted: one tile each gives 32
    assert decode_split_tokens(8, 4, 2048, 132) == 448  # 32 programs: 5 splits of 7 tiles


def test_the_write_kernel_stores_what_the_reference_stores(kernels):
    """Keys from a dense tensor, values as a column slice of a fused projection (rows apart), into one layer's
    views of a `[2, L, N, S, G, A]` cache, converted to its dtype; other slots and layers untouched."""
    gen = torch.Generator().manual_seed(5)
    num_kv, head_dim, tokens = 3, 8, 5  # a row of 24: padded to 32 lanes
    cache = torch.randn(2, 2, 4, 4, num_kv, head_dim, generator=gen).to(DEVICE)
    k_TGA = torch.randn(tokens, num_kv, head_dim, generator=gen).to(DEVICE, torch.float64)
    fused = torch.randn(tokens, 40 + num_kv * head_dim, generator=gen).to(DEVICE)
    v_TGA = fused[:, 40:].unflatten(-1, (num_kv, head_dim))
    slots_T = torch.tensor([13, 0, 7, 15, 2], device=DEVICE)
    want = cache.clone()
    kernels.write_kv_reference(want[0, 1], want[1, 1], k_TGA, v_TGA, slots_T)
    kernels.write_kv_triton(cache[0, 1], cache[1, 1], k_TGA, v_TGA, slots_T)
    assert torch.equal(cache, want)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE == "cpu", reason="the launch settings of real batch sizes: CUDA")
@pytest.mark.parametrize("num_seqs", [2, 64, 300])  # split-K, 128-key tiles, one-warp 32-key tiles
def test_triton_decode_at_each_launch_setting_matches_the_reference(kernels, num_seqs):
    lens = [700, 1000] if num_seqs == 2 else [1 + (37 * i) % 300 for i in range(num_seqs)]  # 2: long, so split
    case = make_case(lens, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16)
    q_BHA = random_q(num_seqs, 16, 64, dtype=torch.bfloat16)
    split = kernels.decode_split_tokens(num_seqs, 4, case.block_tables_BM.shape[1] * 16, num_sms(q_BHA.device))
    want = kernels.paged_decode_reference(q_BHA, *kernel_args(case), 0.125)
    got = kernels.paged_decode_triton(q_BHA, *kernel_args(case), 0.125, split_tokens=split)
    assert (split is not None) == (num_seqs == 2)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
