"""Triton kernels against their torch twins, under TRITON_INTERPRET=1 on CPU (small shapes: the
interpreter costs ~0.5 s per launch at 2048x576) or on CUDA when present."""
import os

import pytest
import torch

pytest.importorskip("triton")

from outlierq import ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

SHAPES = [(1, 1), (77, 123), (64, 128), (256, 576), (33, 1000)]
DTYPES = [(torch.float32, 2e-6), (torch.bfloat16, 2e-3), (torch.float16, 2e-3)]


def _x(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    x[:, : max(1, shape[1] // 50)] *= 40  # outlier channels
    if shape[0] > 2:
        x[1] = 0.0
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
def test_channel_stats(shape, dtype, tol):
    x = _x(shape, dtype)
    thr = (6.0, 100.0)
    k = ops.channel_stats(x, thr, backend="triton")
    t = ops.channel_stats(x, thr, backend="torch")
    assert torch.equal(k.col_absmax, t.col_absmax)
    assert torch.equal(k.row_absmax, t.row_absmax)
    assert torch.equal(k.col_count, t.col_count)
    torch.testing.assert_close(k.col_abssum, t.col_abssum, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_per_token(shape, dtype, tol, smooth):
    x = _x(shape, dtype, seed=1)
    sm = (torch.rand(shape[1], generator=torch.Generator().manual_seed(3)) + 0.5).to(DEVICE) if smooth else None
    qk, sk, ck = ops.quantize_per_token(x, sm, want_col_absmax=True, backend="triton")
    qt, st, ct = ops.quantize_per_token(x, sm, want_col_absmax=True, backend="torch")
    assert torch.equal(sk, st) and torch.equal(ck, ct)  # absmax and scales exact
    diff = (qk.int() - qt.int()).abs()
    assert diff.max() <= 1  # only exact .5 ties may round differently
    assert diff.float().mean() <= (1e-3 if dtype == torch.float32 else 5e-3)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_per_tensor(shape):
    x = _x(shape, torch.float32, seed=2)
    scale = torch.tensor([x.abs().max().item() / 127 / 4], device=DEVICE)  # clamps happen too
    qk = ops.quantize_per_tensor(x, scale, backend="triton")
    qt = ops.quantize_per_tensor(x, scale, backend="torch")
    assert torch.equal(qk, qt)


def test_round_half_even_in_kernel():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=DEVICE)
    q, s, _ = ops.quantize_per_token(x, backend="triton")
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]


@pytest.mark.parametrize("thr", [(6.0,), (1.0, 6.0, 100.0)])
def test_channel_stats_threshold_counts(thr):
    """Counts for any number of thresholds (kept as one padded register block per program)."""
    x = _x((70, 130), torch.float32)
    k = ops.channel_stats(x, thr, backend="triton")
    t = ops.channel_stats(x, thr, backend="torch")
    assert torch.equal(k.col_count, t.col_count)


@pytest.mark.parametrize("m, k, n", [(1, 8, 8), (17, 40, 24), (70, 96, 33), (129, 64, 65)])
def test_int8_gemm_matches_int_mm_and_epilogue(m, k, n):
    g = torch.Generator().manual_seed(m * n)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    xs, ws = torch.rand(m, generator=g) + 0.01, torch.rand(n, generator=g) + 0.01
    want = a.int() @ b.int()  # int32 reference, exact
    want = want.float() * xs[:, None] * ws[None, :]
    got = ops.int8_matmul(a.to(DEVICE), xs.to(DEVICE), b.to(DEVICE), ws.to(DEVICE), backend="triton")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
    from outlierq.kernels.int8_gemm import int8_gemm
    bias = torch.randn(n, generator=g)
    got_b = int8_gemm(a.to(DEVICE), b.to(DEVICE), xs.to(DEVICE), ws.to(DEVICE), bias.to(DEVICE))
    torch.testing.assert_close(got_b.cpu(), want + bias, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1), (77, 123), (33, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_fp8_equals_torchs_cast(shape, dtype):
    """The FP8 kernel's codes and scales equal torch's E4M3 cast of x / (absmax / 448) across
    binades (values from 1e-6 to 1e3 of the row's max, zero rows, ties); a value that rounds to
    zero may be +0 where torch gives -0 (the same number)."""
    from outlierq.kernels.quant_per_token import quantize_per_token_fp8
    from outlierq.quant.formats import FP8

    x = _x(shape, torch.float32)
    if shape[1] > 8:
        x[0] = torch.logspace(-6, 3, shape[1]) * torch.where(torch.arange(shape[1]) % 2 == 0, 1.0, -1.0)
    x = x.to(dtype)
    q, s = quantize_per_token_fp8(x)
    ref_s = (x.float().abs().amax(1) / 448).clamp(min=1e-12)
    assert torch.equal(s, ref_s)
    assert torch.equal(q.float(), FP8.codes(x.float() / ref_s[:, None]).float())


def test_fp8_rounding_in_kernel_carries_into_the_next_binade():
    from outlierq.kernels.quant_per_token import quantize_per_token_fp8

    # with absmax 448 the scale is 1: values round as they are (ties to even, carries to 32 and 128)
    x = torch.tensor([[448.0, 31.45, -124.2, 17.0, 19.0, 0.0013, -0.0011, 1.0625]], device=DEVICE)
    q, s = quantize_per_token_fp8(x)
    assert s.item() == 1.0
    assert q.float().tolist() == [[448.0, 32.0, -128.0, 16.0, 20.0, 0.001953125, -0.001953125, 1.0]]
