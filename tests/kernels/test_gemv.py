"""The few-row projection kernel (`leagues.kernels.gemv`) against its torch reference (under Triton's interpreter
without a GPU) and `F.linear`, and when `linear` takes it."""

import os

import pytest
import torch
import torch.nn.functional as F

from leagues.kernels import gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    gemv.triton is None or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs triton: a GPU or the interpreter",
)


def _operands(rows, n, k, dtype, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=gen).to(DEVICE, dtype) if bias else None
    return x, w, b


@needs_kernels
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows,n,k", [(1, 37, 100), (3, 8, 64), (5, 13, 33)])
def test_the_kernel_matches_the_reference_in_float32(rows, n, k, bias):
    x, w, b = _operands(rows, n, k, torch.float32, bias)
    got = gemv.gemv_triton(x, w, b, block_k=32)  # several reduction tiles, the last one masked
    torch.testing.assert_close(got, gemv.linear_reference(x, w, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_the_kernel_rounds_once_in_bfloat16():
    x, w, b = _operands(2, 24, 256, torch.bfloat16, True, seed=1)
    got = gemv.gemv_triton(x, w, b, block_k=64)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 24)
    want = gemv.linear_reference(x, w, b)  # float32 sums of bf16 products, one rounding
    assert (got.float() - want.float()).abs().max().item() <= 2 * want.float().abs().max().item() * 2**-8


@needs_kernels
def test_strided_rows_and_empty_batches():
    x, w, _ = _operands(4, 16, 48, torch.float32, False, seed=2)
    torch.testing.assert_close(gemv.gemv_triton(x[::2], w), F.linear(x[::2], w), rtol=1e-5, atol=1e-5)
    assert gemv.gemv_triton(x[:0], w).shape == (0, 16)


def test_linear_takes_the_kernel_only_for_a_few_rows_without_gradients_on_cuda():
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    w = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    assert not gemv.applies(x, w)  # the CPU
    torch.testing.assert_close(gemv.linear(x, w), F.linear(x, w))
    if DEVICE == "cuda":
        x, w = x.cuda(), w.cuda()
        assert not gemv.applies(x, w)  # the weight wants a gradient
        with torch.no_grad():
            assert gemv.applies(x, w) and not gemv.applies(x.float(), w.float())
            assert not gemv.applies(torch.randn(gemv.MAX_ROWS + 1, 8, device="cuda", dtype=torch.bfloat16), w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_gpu_the_kernel_agrees_with_the_library_gemm_and_compiles(rows):
    x, w, b = _operands(rows, 1536, 1024, torch.bfloat16, True, seed=rows)
    want = gemv.linear_reference(x, w, b)
    got = gemv.gemv(x, w, b)
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=0.02, atol=0.02)
    with torch.no_grad():
        compiled = torch.compile(gemv.linear, fullgraph=True, dynamic=True)
        assert torch.equal(compiled(x, w, b), got)  # the operator runs as itself inside compiled code
