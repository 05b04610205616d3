"""Torch twins and the native CPU kernels against brute-force references (the twins are the
oracle for the Triton kernels)."""
import os

import pytest
import torch

from outlierq import ops
from outlierq.errors import OutlierqError
from outlierq.ops import native


def _require_native():
    if os.environ.get("OUTLIERQ_NATIVE") == "0":
        pytest.skip("OUTLIERQ_NATIVE=0")
    assert native.available(), "the native CPU kernels did not build (see stderr)"


@pytest.fixture(params=["torch", "native"])
def backend(request):
    if request.param == "native":
        _require_native()
    return request.param


@pytest.mark.parametrize("shape", [(1, 1), (77, 123), (1151, 64), (300, 4000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_stats_matches_brute_force(shape, dtype, backend):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    x[0, 0] = 50.0
    thr = (1.0, 6.0)
    cs = ops.channel_stats(x, thr, backend=backend)
    a = x.float().abs()
    assert torch.equal(cs.col_absmax, a.amax(0))
    assert torch.equal(cs.row_absmax, a.amax(1))
    torch.testing.assert_close(cs.col_abssum, a.sum(0), rtol=1e-5, atol=1e-4)
    for i, t in enumerate(thr):
        assert torch.equal(cs.col_count[i], (a > t).sum(0).int())


def test_empty_inputs(backend):
    x = torch.zeros(0, 5)
    cs = ops.channel_stats(x, (1.0,), backend=backend)
    assert cs.row_absmax.shape == (0,) and torch.equal(cs.col_absmax, torch.zeros(5))
    q, s, col = ops.quantize_per_token(x, want_col_absmax=True, backend=backend)
    assert q.shape == (0, 5) and s.shape == (0,) and torch.equal(col, torch.zeros(5))
    assert ops.quantize_per_tensor(x, torch.tensor([0.1]), backend=backend).shape == (0, 5)


def test_channel_stats_counts_at_and_around_thresholds(backend):
    # values exactly at a threshold are not above it; the next float up is; thresholds above every
    # value count nothing; a NaN chunk still counts the finite values exactly
    t = torch.tensor(6.0)
    up, down = torch.nextafter(t, torch.tensor(7.0)).item(), torch.nextafter(t, torch.tensor(5.0)).item()
    x = torch.zeros(3000, 5)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = 6.0, up, -up, down
    x[7, 4] = float("nan")
    x[8, 4] = 1e4
    cs = ops.channel_stats(x, (6.0, 1e9, -1.0), backend=backend)
    assert cs.col_count[0].tolist() == [0, 3000, 3000, 0, 1]
    assert cs.col_count[1].tolist() == [0] * 5
    assert cs.col_count[2].tolist() == [3000] * 4 + [2999]  # |NaN| > -1 is False
    # NaN propagates to its column's and row's maximum, as torch.amax does
    assert cs.col_absmax[4].isnan() and cs.row_absmax[7].isnan()
    assert cs.col_absmax[:4].isfinite().all() and cs.row_absmax[8] == 1e4
    assert cs.col_abssum[4].isnan()


def _ref_quant(x):
    amax = x.float().abs().amax(1).clamp(min=1e-12)
    return torch.round(x.float() * (amax.reciprocal() * 127)[:, None]).clamp(-127, 127).to(torch.int8), amax / 127


@pytest.mark.parametrize("shape", [(1, 8), (77, 123), (1151, 64)])
def test_quantize_per_token_matches_reference(shape, backend):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    x[0] = 0.0  # an all-zero row gives scale ~0 and codes 0, no NaN
    q, s, col = ops.quantize_per_token(x, want_col_absmax=True, backend=backend)
    rq, rs = _ref_quant(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert torch.equal(col, x.abs().amax(0))
    assert torch.isfinite(s).all() and (q[0] == 0).all()


def test_quantize_rounds_half_to_even(backend):
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, s, _ = ops.quantize_per_token(x, backend=backend)
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_smooth_divides_before_quantizing(backend):
    x = torch.randn(16, 32)
    sm = torch.rand(32) + 0.5
    q, s, _ = ops.quantize_per_token(x, smooth=sm, backend=backend)
    rq, rs = _ref_quant(x * sm.reciprocal())
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_per_tensor_static(backend):
    x = torch.randn(50, 24)
    scale = torch.tensor([0.01])
    q = ops.quantize_per_tensor(x, scale, backend=backend)
    assert torch.equal(q, torch.round(x * scale.reciprocal()).clamp(-127, 127).to(torch.int8))
    sm = torch.rand(24) + 0.5
    q = ops.quantize_per_tensor(x, scale, sm, backend=backend)
    ref = torch.round(x * sm.reciprocal() * scale.reciprocal()).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (1031, 300), (700, 2053)])  # one part, and several
def test_native_is_the_twin_bit_for_bit(dtype, shape):
    """Maxima, counts, scales and codes equal the twin's exactly, with smoothing, outlier
    channels, rows read through a stride, and any thread count; sums to float32 rounding and
    identical across thread counts (parts add in a fixed order)."""
    _require_native()
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(shape[0], shape[1] + 7, generator=g) * 3
    wide[:, 1] *= 60
    x = wide.to(dtype)[:, 3: 3 + shape[1]]  # row stride > row length
    thr = torch.tensor([1.0, 6.0, 100.0])
    sm = torch.rand(shape[1], generator=g) + 0.5
    ref_cs = ops.torch_ops.channel_stats(x.contiguous(), thr)
    ref_q = ops.torch_ops.quantize_per_token(x.contiguous(), sm, True)
    scale = torch.tensor([0.05])
    ref_t = ops.torch_ops.quantize_per_tensor(x.contiguous(), scale, sm)
    threads = torch.get_num_threads()
    sums = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            cs = native.channel_stats(x, thr)
            for i in (0, 2, 3):
                assert torch.equal(cs[i], ref_cs[i])
            torch.testing.assert_close(cs[1], ref_cs[1], rtol=1e-5, atol=1e-3)
            sums.append(cs[1])
            assert all(torch.equal(a, b) for a, b in zip(native.quantize_per_token(x, sm, True), ref_q))
            assert torch.equal(native.quantize_per_tensor(x, scale, sm), ref_t)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sums[0], sums[1])


def test_native_static_inverse_is_the_twins_float32_reciprocal():
    """native.quantize_per_tensor computes 1/scale in Python floats (fast for decode rows): its
    codes equal the twin's float32 clamp-and-reciprocal for scales across the whole float32 range,
    at the clamp, zero, a bf16 scale and NaN."""
    _require_native()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 64, generator=g)
    scales = [*(torch.rand(300, generator=g) * 2.0 ** torch.randint(-60, 20, (300,), generator=g)).tolist(),
              1e-12, 1.0000001e-12, 9.99e-13, 0.0, 3.0, float("nan")]
    for v in scales:
        for dt in (torch.float32, torch.bfloat16):
            scale = torch.tensor([v], dtype=dt)
            assert torch.equal(native.quantize_per_tensor(x * v * 50, scale),
                               ops.torch_ops.quantize_per_tensor(x * v * 50, scale)), (v, dt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (700, 2053)])  # one part, and several
def test_native_fp8_is_the_twin_bit_for_bit(dtype, shape):
    """native.quantize_fp8's float32 codes are the twin's float8 codes' values, and its scales the
    twin's, per token and static, over eleven decades of magnitude, a zero row, a saturating
    static scale, NaN, and rows read through a stride."""
    _require_native()
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(shape[0], shape[1] + 5, generator=g) * torch.logspace(-7, 4, shape[1] + 5)
    wide[0] = 0
    wide[-1, 3] = float("nan")
    x = wide.to(dtype)[:, 2: 2 + shape[1]]
    for scale in (None, torch.tensor([0.37]), torch.tensor(1e-3, dtype=torch.bfloat16)):
        q, s = native.quantize_fp8(x, scale)
        ref_q, ref_s = ops.torch_ops.quantize_fp8(x.contiguous(), scale)
        assert q.dtype == torch.float32 and ref_q.dtype == torch.float8_e4m3fn
        assert torch.equal(s.nan_to_num(7.0), ref_s.nan_to_num(7.0))
        assert torch.equal(q.nan_to_num(7.0), ref_q.float().nan_to_num(7.0)), scale


def test_native_fp8_rounding_sweeps_the_float32_bit_patterns():
    """Every 1201st float32 bit pattern of both signs (normals, subnormals, E4M3's subnormal
    range, saturation, infinities, NaNs) and every tie between two E4M3 values rounds as torch's cast to float8_e4m3fn after
    the twin's clamp: the bit-level rounding of cpu_kernels.c's e4m3() has no other reference."""
    _require_native()
    bits = torch.arange(0, 2 ** 31, 1201, dtype=torch.int64).to(torch.int32)
    grid = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite()].unique()
    mid = (grid[1:] + grid[:-1]) / 2  # every tie (exact in float32), and its neighbours
    ties = torch.cat([mid, mid.nextafter(torch.tensor(float("inf"))), mid.nextafter(torch.tensor(-float("inf")))])
    r = torch.cat([bits.view(torch.float32), -bits.view(torch.float32), ties])
    r = torch.cat([r, torch.zeros(-r.numel() % 1024)]).reshape(-1, 1024)
    q, _ = native.quantize_fp8(r, torch.tensor(1.0))
    ref, _ = ops.torch_ops.quantize_fp8(r, torch.tensor(1.0))
    assert torch.equal(q.nan_to_num(7.0), ref.float().nan_to_num(7.0))
    assert q.isnan().sum() == r.isnan().sum() > 0


def test_fp8_dispatch_gives_float32_codes_only_to_the_fp32_gemm(monkeypatch):
    """auto: the native kernel's float32 codes where FP8 GEMMs multiply fp32 codes, the twin's
    float8 codes where torch._scaled_mm takes them; the same values either way."""
    _require_native()
    from outlierq.ops import gemm
    x = torch.randn(9, 40)
    for path, dtype in (("fp32", torch.float32), ("scaled_mm", torch.float8_e4m3fn)):
        monkeypatch.setattr(gemm, "fp8_gemm_path", lambda p=path: p)
        monkeypatch.setattr(ops, "fp8_gemm_path", lambda p=path: p)
        q, s = ops.quantize_fp8(x)
        assert q.dtype == dtype
        assert torch.equal(q.float(), ops.torch_ops.quantize_fp8(x)[0].float())


def test_int8_matmul_is_exact_int32():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (33, 70), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (70, 45), generator=g, dtype=torch.int8)
    xs, ws = torch.rand(33) + 0.1, torch.rand(45) + 0.1
    out = ops.int8_matmul(a, xs, b, ws)
    ref = (a.double() @ b.double()) * xs.double()[:, None] * ws.double()[None]
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_triton_backend_refuses_cpu_tensor(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(OutlierqError, match="CUDA"):
        ops.channel_stats(torch.zeros(4, 4), backend="triton")
    with pytest.raises(OutlierqError, match="unknown backend"):
        ops.channel_stats(torch.zeros(4, 4), backend="cuda")


def test_native_backend_refuses_what_it_cannot_serve(monkeypatch):
    with pytest.raises(OutlierqError, match="native"):
        ops.channel_stats(torch.zeros(4, 4, dtype=torch.float64), backend="native")
    monkeypatch.setattr(native, "available", lambda: False)
    with pytest.raises(OutlierqError, match="native"):
        ops.quantize_per_token(torch.zeros(4, 4), backend="native")
    q, s, _ = ops.quantize_per_token(torch.ones(4, 4), backend="auto")  # falls back to the twin
    assert (q == 127).all()


def test_native_build_failure_falls_back_to_the_twins(monkeypatch, tmp_path, capfd):
    """No working compiler (or an unusable cache): one line on stderr, `auto` runs the twins."""
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("OUTLIERQ_CACHE", str(tmp_path / "cache"))
    native._lib.cache_clear()
    try:
        assert not native.available()
        assert "native CPU kernels unavailable" in capfd.readouterr().err
        x = torch.randn(9, 7)
        cs = ops.channel_stats(x, (0.5,))
        assert torch.equal(cs.col_absmax, x.abs().amax(0))
    finally:
        native._lib.cache_clear()
