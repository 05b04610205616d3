"""Fused 8-bit activation quantization (int8; FP8 E4M3 per token). Tensors in, tensors out; no policy.

Per token (dynamic): one read of each row (the whole row is held in registers), optional
per-channel smoothing (x * inv_smooth), absmax -> scale = absmax/127 -> codes rounded half to even,
and optionally the per-channel absmax of the same (smoothed) input, merged with one atomic per
column per program. Per tensor (static): codes = round(x * inv_scale).

Rounding: `libdevice.rint` does not run in the Triton interpreter, so ties go to even with the
fp32 magic-number trick: (v + 1.5 * 2^23) - 1.5 * 2^23 is exact round-half-even for |v| < 2^22.
FP8: the interpreter's float -> fp8 cast rounds wrongly where rounding carries into the next
binade (-31.45 became -16, not -32), so values are rounded to E4M3's grid in fp32 first (the ulp
of a value's binade from its exponent bits, then the same round-half-even) and only exact values
are cast: the same codes as torch's cast, in the interpreter and on a GPU."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def _round_half_even(v):
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _quant_token_kernel(x_ptr, inv_smooth_ptr, q_ptr, scale_ptr, col_ptr, M, N, stride_m,
                        HAS_SMOOTH: tl.constexpr, WANT_COL: tl.constexpr, BLOCK_N: tl.constexpr,
                        ROWS: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_SMOOTH:
        inv_s = tl.load(inv_smooth_ptr + cols, mask=cmask, other=1.0)
    cmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    row0 = pid * ROWS
    for r in range(row0, tl.minimum(row0 + ROWS, M)):
        x = tl.load(x_ptr + r * stride_m + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * inv_s
        a = tl.abs(x)
        if WANT_COL:
            cmax = tl.maximum(cmax, a)
        amax = tl.maximum(tl.max(a, axis=0), 1e-12)
        tl.store(scale_ptr + r, amax / 127.0)
        inv = (1.0 / amax) * 127.0
        q = _round_half_even(x * inv)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + r * N + cols, q.to(tl.int8), mask=cmask)
    if WANT_COL:
        tl.atomic_max(col_ptr + cols, cmax, mask=cmask)


@triton.jit
def _quant_tensor_kernel(x_ptr, inv_smooth_ptr, inv_scale_ptr, q_ptr, M, N, stride_m,
                         HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(inv_smooth_ptr + cols, mask=cols < N, other=1.0)[None, :]
    q = _round_half_even(x * tl.load(inv_scale_ptr))
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], q.to(tl.int8), mask=mask)


@triton.jit
def _snap_e4m3(v):
    """v (fp32) to the nearest E4M3 value, round half to even, saturating at +-448: 3 mantissa bits,
    so the step in v's binade is 2^(e - 3), and 2^-9 below the smallest normal (2^-6)."""
    e = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    ulp = ((e + 124) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    r = _round_half_even(v / ulp) * ulp
    return tl.minimum(tl.maximum(r, -448.0), 448.0)


@triton.jit
def _quant_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, M, N, stride_m, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    row0 = tl.program_id(0) * ROWS
    for r in range(row0, tl.minimum(row0 + ROWS, M)):
        x = tl.load(x_ptr + r * stride_m + cols, mask=cmask, other=0.0).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        tl.store(scale_ptr + r, s)
        tl.store(q_ptr + r * N + cols, _snap_e4m3(x / s).to(tl.float8e4nv), mask=cmask)


# CUDA: rows per program and warps autotuned per row width; the column maxima merge with
# atomics, so every trial starts from a zeroed output.
_TOKEN_CONFIGS = [triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (2, 4, 8, 16)]
_token_tuned = triton.autotune(configs=_TOKEN_CONFIGS, key=["N"], reset_to_zero=["col_ptr"])(_quant_token_kernel)
_TENSOR_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
                   for bm, bn, w in ((32, 128, 4), (16, 256, 4), (64, 128, 8), (32, 256, 8), (8, 512, 4))]
_tensor_tuned = triton.autotune(configs=_TENSOR_CONFIGS, key=["N"])(_quant_tensor_kernel)


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None,
                       want_col_absmax: bool = False, rows_per_prog: int = 4):
    """x [M, K] -> (int8 codes [M, K], f32 scales [M], f32 col_absmax [K] or None).
    rows_per_prog applies where nothing is tuned (the interpreter)."""
    m, n = x.shape
    dev = x.device
    q = torch.empty(m, n, dtype=torch.int8, device=dev)
    scales = torch.empty(m, dtype=torch.float32, device=dev)
    col = torch.zeros(n, dtype=torch.float32, device=dev) if want_col_absmax else None
    if m == 0:
        return q, scales, col
    inv_s = smooth.float().reciprocal().contiguous() if smooth is not None else scales
    args = (x, inv_s, q, scales, col if col is not None else scales, m, n, x.stride(0))
    consts = dict(HAS_SMOOTH=smooth is not None, WANT_COL=want_col_absmax, BLOCK_N=triton.next_power_of_2(n))
    if dev.type == "cuda":
        _token_tuned[lambda meta: (triton.cdiv(m, meta["ROWS"]),)](*args, **consts)
    else:
        _quant_token_kernel[(triton.cdiv(m, rows_per_prog),)](*args, ROWS=rows_per_prog, **consts,
                                                               num_warps=8 if n >= 4096 else 4)
    return q, scales, col


_fp8_tuned = triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w) for r in (1, 2, 4, 8) for w in (2, 4, 8)],
                             key=["N"])(_quant_token_fp8_kernel)


def quantize_per_token_fp8(x: torch.Tensor, rows_per_prog: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (FP8 E4M3 codes [M, K], f32 scales [M]), scale = max(absmax/448, 1e-12).
    rows_per_prog applies where nothing is tuned (the interpreter)."""
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    args = (x, q, scales, m, n, x.stride(0))
    if x.device.type == "cuda":
        _fp8_tuned[lambda meta: (triton.cdiv(m, meta["ROWS"]),)](*args, BLOCK_N=triton.next_power_of_2(n))
    else:
        _quant_token_fp8_kernel[(triton.cdiv(m, rows_per_prog),)](*args, BLOCK_N=triton.next_power_of_2(n),
                                                                  ROWS=rows_per_prog)
    return q, scales


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None = None,
                        block_m: int = 32, block_n: int = 128) -> torch.Tensor:
    """Static per-tensor int8: codes = round(x / smooth * (1 / scale)), clamped to [-127, 127].
    block_m / block_n apply where nothing is tuned (the interpreter)."""
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.int8, device=x.device)
    if m == 0:
        return q
    inv = scale.float().clamp(min=1e-12).reciprocal().reshape(1).to(x.device)
    inv_s = smooth.float().reciprocal().contiguous() if smooth is not None else inv
    args = (x, inv_s, inv, q, m, n, x.stride(0))
    if x.device.type == "cuda":
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
        _tensor_tuned[grid](*args, HAS_SMOOTH=smooth is not None)
    else:
        _quant_tensor_kernel[(triton.cdiv(m, block_m), triton.cdiv(n, block_n))](
            *args, HAS_SMOOTH=smooth is not None, BLOCK_M=block_m, BLOCK_N=block_n)
    return q
