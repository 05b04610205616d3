"""int8 x int8 -> int32 GEMM with the W8A8 epilogue fused: out = acc * x_scale[m] * w_scale[n]
(+ bias[n]) in fp32. Tensors in, tensors out; no policy.

Tiles of [BLOCK_M, BLOCK_K] x [BLOCK_K, BLOCK_N] int8 accumulate in int32 registers (tl.dot), then
the scales (and bias) are applied once per output tile, so the int32 accumulator never goes to
memory. Programs are ordered in groups of GROUP_M row tiles so neighbours share weight tiles in
L2. On CUDA the block sizes are autotuned per (M, N, K); the interpreter runs one fixed config."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, M, N, K,
                      stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + rm, mask=rm < M, other=0.0)
    ws = tl.load(ws_ptr + rn, mask=rn < N, other=0.0)
    out = acc.to(tl.float32) * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, out,
             mask=(rm[:, None] < M) & (rn[None, :] < N))


_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 256, 128, 8, 3), (256, 128, 128, 8, 3), (128, 128, 128, 4, 4),
                                     (128, 128, 64, 4, 4), (64, 128, 128, 4, 4), (64, 64, 64, 4, 3))]
_tuned = triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])(_int8_gemm_kernel)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """a int8 [M, K] @ b int8 [K, N] -> fp32 [M, N] = int32 product * x_scale[M, 1] * w_scale[N]
    (+ bias[N])."""
    m, k = a.shape
    n = b.shape[1]
    c = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0 or n == 0:
        return c
    xs = x_scale.reshape(-1).to(torch.float32).contiguous()
    ws = w_scale.reshape(-1).to(torch.float32).contiguous()
    bias_t = bias.contiguous() if bias is not None else ws
    args = (a, b, xs, ws, bias_t, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            c.stride(0), c.stride(1))
    if os.environ.get("TRITON_INTERPRET") == "1":  # one small config: the interpreter is slow
        grid = (triton.cdiv(m, 32) * triton.cdiv(n, 32),)
        _int8_gemm_kernel[grid](*args, HAS_BIAS=bias is not None, BLOCK_M=32, BLOCK_N=32,
                                BLOCK_K=32, GROUP_M=4)
    else:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _tuned[grid](*args, HAS_BIAS=bias is not None)
    return c
