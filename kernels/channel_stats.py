"""Fused per-channel statistics: one read of x [M, N] gives per-channel absmax, sum |x| and counts
of |x| above T thresholds, and per-token absmax. Tensors in, tensors out; no policy.

Grid: (column blocks, row groups). Each program walks its rows in BLOCK_M tiles, keeps column
partials (maxima, sums and the T threshold counts, as one [T_PAD, BLOCK_N] block) in registers
and merges them with one atomic per column and statistic; per-token maxima merge across column
blocks with atomic max (|x| >= 0, so float atomic max is exact and order-free)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _channel_stats_kernel(x_ptr, thr_ptr, colmax_ptr, colsum_ptr, count_ptr, rowmax_ptr,
                          M, N, stride_m, rows_per_prog,
                          T: tl.constexpr, T_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    cmax = tl.zeros([BLOCK_N], dtype=tl.float32)
    csum = tl.zeros([BLOCK_N], dtype=tl.float32)
    t_ids = tl.arange(0, T_PAD)
    counts = tl.zeros([T_PAD, BLOCK_N], dtype=tl.int32)
    row0 = pid_m * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, M)
    for r in range(row0, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        a = tl.abs(tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask,
                           other=0.0).to(tl.float32))
        cmax = tl.maximum(cmax, tl.max(a, axis=0))
        csum += tl.sum(a, axis=0)
        tl.atomic_max(rowmax_ptr + rows, tl.max(a, axis=1), mask=rmask)
        for t in tl.static_range(T):
            th = tl.load(thr_ptr + t)
            cnt = tl.sum((a > th).to(tl.int32), axis=0)
            counts += tl.where(t_ids[:, None] == t, cnt[None, :], 0)
    tl.atomic_max(colmax_ptr + cols, cmax, mask=cmask)
    tl.atomic_add(colsum_ptr + cols, csum, mask=cmask)
    if T > 0:
        tl.atomic_add(count_ptr + t_ids[:, None] * N + cols[None, :], counts,
                      mask=(t_ids[:, None] < T) & cmask[None, :])


# CUDA: block shapes and warps autotuned per row width (calibration sees a handful of widths);
# the outputs are merged with atomics, so every trial starts from zeroed outputs.
_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
            for bm, bn, w in ((32, 128, 4), (16, 256, 4), (32, 256, 8), (64, 128, 8), (64, 64, 4),
                              (16, 512, 8))]
_tuned = triton.autotune(configs=_CONFIGS, key=["N"],
                         reset_to_zero=["colmax_ptr", "colsum_ptr", "count_ptr", "rowmax_ptr"])(
    _channel_stats_kernel)
_ROW_QUANTUM = 64  # rows_per_prog is a multiple of every BLOCK_M above


def channel_stats(x: torch.Tensor, thresholds: torch.Tensor, block_m: int = 32,
                  block_n: int = 128, rows_per_prog: int | None = None):
    """x [M, N] contiguous (fp32/fp16/bf16), thresholds f32 [T] ->
    (col_absmax f32[N], col_abssum f32[N], col_count i32[T, N], row_absmax f32[M]).
    block_m / block_n / rows_per_prog apply where nothing is tuned (the interpreter)."""
    m, n = x.shape
    t = thresholds.numel()
    dev = x.device
    col_absmax = torch.zeros(n, dtype=torch.float32, device=dev)
    col_abssum = torch.zeros(n, dtype=torch.float32, device=dev)
    col_count = torch.zeros(max(t, 1), n, dtype=torch.int32, device=dev)
    row_absmax = torch.zeros(m, dtype=torch.float32, device=dev)
    if m == 0 or n == 0:
        return col_absmax, col_abssum, col_count[:t], row_absmax
    thr = thresholds.to(device=dev, dtype=torch.float32).contiguous()
    args = (x, thr, col_absmax, col_abssum, col_count, row_absmax, m, n, x.stride(0))
    consts = dict(T=t, T_PAD=triton.next_power_of_2(max(t, 1)))
    if dev.type == "cuda" and rows_per_prog is None:
        # enough row groups to fill the GPU, few enough that column atomics stay rare
        groups = max(1, min(triton.cdiv(m, _ROW_QUANTUM), 4 * _sm_count(dev) // triton.cdiv(n, 128) + 1))
        rpp = triton.cdiv(triton.cdiv(m, groups), _ROW_QUANTUM) * _ROW_QUANTUM
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, rpp))  # noqa: E731
        _tuned[grid](*args, rpp, **consts)
        return col_absmax, col_abssum, col_count[:t], row_absmax
    if rows_per_prog is None:
        groups = max(1, min(triton.cdiv(m, block_m), 4 * _sm_count(dev) // triton.cdiv(n, block_n) + 1))
        rows_per_prog = triton.cdiv(triton.cdiv(m, groups), block_m) * block_m
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, rows_per_prog))
    _channel_stats_kernel[grid](*args, rows_per_prog, BLOCK_M=block_m, BLOCK_N=block_n, **consts)
    return col_absmax, col_abssum, col_count[:t], row_absmax


def _sm_count(dev: torch.device) -> int:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).multi_processor_count
    return 4
