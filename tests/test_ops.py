"""Torch twins against brute-force references (the twins are the oracle for the kernels)."""
import pytest
import torch

from outlierq import ops
from outlierq.errors import OutlierqError


@pytest.mark.parametrize("shape", [(1, 1), (77, 123), (1151, 64), (300, 4000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channel_stats_matches_brute_force(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    x[0, 0] = 50.0
    thr = (1.0, 6.0)
    cs = ops.channel_stats(x, thr, backend="torch")
    a = x.float().abs()
    assert torch.equal(cs.col_absmax, a.amax(0))
    assert torch.equal(cs.row_absmax, a.amax(1))
    torch.testing.assert_close(cs.col_abssum, a.sum(0), rtol=1e-5, atol=1e-4)
    for i, t in enumerate(thr):
        assert torch.equal(cs.col_count[i], (a > t).sum(0).int())


def test_channel_stats_counts_at_and_around_thresholds():
    # values exactly at a threshold are not above it; the next float up is; thresholds above every
    # value count nothing; a NaN chunk still counts the finite values exactly
    t = torch.tensor(6.0)
    up, down = torch.nextafter(t, torch.tensor(7.0)).item(), torch.nextafter(t, torch.tensor(5.0)).item()
    x = torch.zeros(3000, 5)
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = 6.0, up, -up, down
    x[7, 4] = float("nan")
    x[8, 4] = 1e4
    cs = ops.channel_stats(x, (6.0, 1e9, -1.0), backend="torch")
    assert cs.col_count[0].tolist() == [0, 3000, 3000, 0, 1]
    assert cs.col_count[1].tolist() == [0] * 5
    assert cs.col_count[2].tolist() == [3000] * 4 + [2999]  # |NaN| > -1 is False


def _ref_quant(x):
    amax = x.float().abs().amax(1).clamp(min=1e-12)
    return torch.round(x.float() * (amax.reciprocal() * 127)[:, None]).clamp(-127, 127).to(torch.int8), amax / 127


@pytest.mark.parametrize("shape", [(1, 8), (77, 123), (1151, 64)])
def test_quantize_per_token_matches_reference(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3
    x[0] = 0.0  # an all-zero row gives scale ~0 and codes 0, no NaN
    q, s, col = ops.quantize_per_token(x, want_col_absmax=True, backend="torch")
    rq, rs = _ref_quant(x)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert torch.equal(col, x.abs().amax(0))
    assert torch.isfinite(s).all() and (q[0] == 0).all()


def test_quantize_rounds_half_to_even():
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, s, _ = ops.quantize_per_token(x, backend="torch")
    assert s.item() == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_smooth_divides_before_quantizing():
    x = torch.randn(16, 32)
    sm = torch.rand(32) + 0.5
    q, s, _ = ops.quantize_per_token(x, smooth=sm, backend="torch")
    rq, rs = _ref_quant(x * sm.reciprocal())
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_per_tensor_static():
    x = torch.randn(50, 24)
    scale = torch.tensor([0.01])
    q = ops.quantize_per_tensor(x, scale, backend="torch")
    assert torch.equal(q, torch.round(x * scale.reciprocal()).clamp(-127, 127).to(torch.int8))


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
