"""Pure-PyTorch twins of the Triton kernels: the CPU path and the test oracle.

Same signatures as kernels/*.py. They reduce cache-sized row chunks into one reused fp32 buffer
instead of materialising `x.abs()` (a full-size temporary): on these CPUs the naive
`x.abs().amax(0)` reaches ~7% of memory bandwidth, chunking several times that."""
from __future__ import annotations

import torch

# ~1 MiB of fp32 per chunk: big enough to amortise Python/dispatch overhead, small enough to stay
# in L2 between the reductions that re-read it.
_CHUNK_BYTES = 1 << 20
_EPS = 1e-12  # absmax floor: an all-zero row/tensor gets codes 0, never inf/NaN


def _rows_per_chunk(n: int) -> int:
    return max(1, _CHUNK_BYTES // (4 * max(n, 1)))


def channel_stats(x: torch.Tensor, thresholds: torch.Tensor):
    """One logical read of x [M, N] -> (col_absmax f32[N], col_abssum f32[N],
    col_count i32[T, N] of |x| > thresholds[t], row_absmax f32[M])."""
    m, n = x.shape
    t = thresholds.numel()
    col_absmax = torch.zeros(n, dtype=torch.float32, device=x.device)
    col_abssum = torch.zeros(n, dtype=torch.float32, device=x.device)
    col_count = torch.zeros(t, n, dtype=torch.int32, device=x.device)
    row_absmax = torch.empty(m, dtype=torch.float32, device=x.device)
    thr = thresholds.tolist()
    step = _rows_per_chunk(n)
    rows = min(step, m)
    buf = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    ind = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    col = torch.empty(n, dtype=torch.float32, device=x.device)
    for s in range(0, m, step):
        c = x[s: s + step]
        r = c.shape[0]
        a = buf[:r]
        if c.dtype == torch.float32:
            torch.abs(c, out=a)
        else:
            a.copy_(c).abs_()
        torch.amax(a, 0, out=col)
        chunk_max = col.max().item()
        torch.maximum(col_absmax, col, out=col_absmax)
        torch.sum(a, 0, out=col)
        col_abssum += col
        torch.amax(a, 1, out=row_absmax[s: s + r])
        for i, th in enumerate(thr):
            if th >= chunk_max:  # nothing above it in this chunk (the common case for large th)
                continue
            if chunk_max != chunk_max:  # NaN: the float indicator below would not be 0/1
                col_count[i] += (a > th).sum(0, dtype=torch.int32)
                continue
            # |x| > th as an exact float 0/1: a - th > 0 iff a > th (IEEE subtraction of distinct
            # floats is never 0), then clamp + sign. ~2x faster than a bool compare + bool sum here.
            d = ind[:r]
            torch.sub(a, th, out=d).clamp_(min=0.0).sign_()
            torch.sum(d, 0, out=col)
            col_count[i] += col.to(torch.int32)
    return col_absmax, col_abssum, col_count, row_absmax


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None,
                       want_col_absmax: bool = False):
    """x [M, K] (optionally divided by smooth [K]) -> (int8 codes [M, K], fp32 scales [M],
    col_absmax f32[K] of the smoothed input or None). scale = absmax/127, codes round half to even."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    col = torch.zeros(k, dtype=torch.float32, device=x.device) if want_col_absmax else None
    inv_s = None if smooth is None else smooth.float().reciprocal()
    step = _rows_per_chunk(k)
    buf = torch.empty(min(step, m), k, dtype=torch.float32, device=x.device)
    for s in range(0, m, step):
        c = x[s: s + step]
        xf = buf[: c.shape[0]]
        xf.copy_(c)
        if inv_s is not None:
            xf.mul_(inv_s)
        amax = xf.abs().amax(1)
        if col is not None:
            torch.maximum(col, xf.abs().amax(0), out=col)
        amax.clamp_(min=_EPS)
        scales[s: s + c.shape[0]] = amax / 127.0
        inv = amax.reciprocal().mul_(127.0)
        q[s: s + c.shape[0]] = xf.mul_(inv[:, None]).round_().clamp_(-127, 127)
    return q, scales, col


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 E4M3 codes of x [M, K] and their row scales [M]: per token (scale None), scale =
    max(absmax / 448, 1e-12); static, the one `scale`. codes = E4M3(clamp(x / scale, +-448))."""
    xf = x.float()
    if scale is None:
        s = (xf.abs().amax(1) / 448.0).clamp_(min=_EPS)
    else:
        s = scale.float().reshape(-1)[:1].expand(x.shape[0])
    return (xf / s[:, None]).clamp_(-448.0, 448.0).to(torch.float8_e4m3fn), s


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None = None):
    """Static per-tensor int8: codes = round(x / smooth * (1/scale)) clamped to [-127, 127]."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    inv = scale.float().clamp(min=_EPS).reciprocal()
    inv_s = None if smooth is None else smooth.float().reciprocal()
    step = _rows_per_chunk(k)
    buf = torch.empty(min(step, m), k, dtype=torch.float32, device=x.device)
    for s in range(0, m, step):
        c = x[s: s + step]
        xf = buf[: c.shape[0]]
        xf.copy_(c)
        if inv_s is not None:
            xf.mul_(inv_s)
        q[s: s + c.shape[0]] = xf.mul_(inv).round_().clamp_(-127, 127)
    return q


def int8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq_t: torch.Tensor, w_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 [M, K] @ int8 [K, N] accumulated in int32, then * x_scale[M, 1] * w_scale[N] in fp32.
    A float `wq_t` (the same codes as fp32, see ops.gemm) multiplies in fp32 instead: exact
    products, fp32 accumulation, for CPUs whose int8 GEMM is slow."""
    m, k = xq.shape
    n = wq_t.shape[1]
    if wq_t.is_floating_point():
        acc = xq.to(wq_t.dtype) @ wq_t
    elif xq.is_cuda and (m <= 16 or k % 8 or n % 8):
        # cuBLASLt int8 wants M > 16 and K, N multiples of 8: pad with zeros (exact in int32).
        mp, kp, np_ = max(m, 17), -(-k // 8) * 8, -(-n // 8) * 8
        xp = torch.zeros(mp, kp, dtype=torch.int8, device=xq.device)
        xp[:m, :k] = xq
        wp = torch.zeros(kp, np_, dtype=torch.int8, device=xq.device)
        wp[:k, :n] = wq_t
        acc = torch._int_mm(xp, wp)[:m, :n]
    else:
        acc = torch._int_mm(xq, wq_t)
    out = acc.to(torch.float32).mul_(x_scale.view(-1, 1)).mul_(w_scale.view(1, -1))
    return out.to(out_dtype)
