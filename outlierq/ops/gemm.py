"""Which int8 GEMM to run on a CPU.

torch._int_mm is fast where the CPU has AVX-512 VNNI (oneDNN's int8 kernels) and falls back to a
slow reference loop elsewhere: on an AVX2-only EPYC it measured 30x slower than the fp32 matmul,
which made every int8 evaluation slower than float. There, multiplying the int8 codes as fp32
(exact products, fp32 accumulation: the dequantize-and-matmul oracle's arithmetic) runs at fp32
speed. The choice is measured once per process on a small probe and can be forced with
$OUTLIERQ_INT8_GEMM=int_mm|fp32. CUDA always uses the int8 GEMM."""
from __future__ import annotations

import functools
import os
import time

import torch

PATHS = ("int_mm", "fp32")
_SLOWER = 2.0  # how much slower than fp32 the int8 GEMM's probe must be to fall back


@functools.lru_cache(maxsize=None)
def cpu_gemm_path() -> str:
    forced = _forced("OUTLIERQ_INT8_GEMM", PATHS)
    if forced:
        return forced
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (128, 512), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=g)
    wf = w.float()
    # fp32 only where int8 is clearly slower (30x on AVX2; 2.8x *faster* with VNNI): a probe taken
    # while another process still held the cores once picked fp32 on a VNNI Xeon and made W8A8
    # slower than float there, with 4x the weight memory
    return "fp32" if _best_of(lambda: torch._int_mm(x, w)) > _SLOWER * _best_of(lambda: x.float() @ wf) else "int_mm"


def gemm_operand(wq_t: torch.Tensor) -> torch.Tensor:
    """The weight operand [K, N] in the form this device's GEMM wants: int8 codes for the int8
    GEMM, the same codes as fp32 where that is faster (4x the memory of int8, the float model's)."""
    if wq_t.is_cuda or cpu_gemm_path() == "int_mm":
        return wq_t.contiguous()
    return wq_t.float().contiguous()


FP8_PATHS = ("scaled_mm", "fp32")


@functools.lru_cache(maxsize=None)
def fp8_gemm_path() -> str:
    """FP8 x FP8 on a CPU: torch._scaled_mm (row-wise scales) where it beats multiplying the codes
    as fp32 (exact products, fp32 accumulation, like the int8 fallback). On AVX-512 without AMX
    it measured about 1.8x slower than fp32 at 2048x576x1536, so fp32 is the usual pick; CUDA
    always runs _scaled_mm. $OUTLIERQ_FP8_GEMM=scaled_mm|fp32 forces it."""
    forced = _forced("OUTLIERQ_FP8_GEMM", FP8_PATHS)
    if forced:
        return forced
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 512, generator=g).to(torch.float8_e4m3fn)
    w = torch.randn(512, 512, generator=g).to(torch.float8_e4m3fn)
    sx, sw, wf = torch.ones(128, 1), torch.ones(1, 512), w.float().t().contiguous()
    try:
        mm = _best_of(lambda: torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32))
    except RuntimeError:  # (a build without a CPU kernel for it)
        return "fp32"
    return "scaled_mm" if mm <= _best_of(lambda: x.float() @ wf) else "fp32"


def fp8_operand(w: torch.Tensor) -> torch.Tensor:
    """The FP8 weight codes [N, K] as this device's GEMM wants them: a column-major [K, N] view
    for _scaled_mm, the same codes as fp32 [K, N] for the fp32 path."""
    if w.is_cuda or fp8_gemm_path() == "scaled_mm":
        return w.t()
    return w.float().t().contiguous()


def fp8_matmul(q: torch.Tensor, s: torch.Tensor, wt: torch.Tensor, ws: torch.Tensor) -> torch.Tensor:
    """FP8 codes q [M, K] with row scales s [M] times the weight operand wt [K, N] (`fp8_operand`)
    with column scales ws [N] -> fp32 [M, N]."""
    if wt.dtype == torch.float32:
        return (q.float() @ wt).mul_(s.float()[:, None]).mul_(ws.float()[None, :])
    return torch._scaled_mm(q, wt, scale_a=s.float()[:, None].contiguous(), scale_b=ws.float()[None, :].contiguous(),
                            out_dtype=torch.float32)


def describe() -> str:
    """A line for benchmarks and results: which int8 GEMM runs here and why."""
    cap = torch.backends.cpu.get_cpu_capability()
    how = "forced by OUTLIERQ_INT8_GEMM" if os.environ.get("OUTLIERQ_INT8_GEMM") else "measured"
    return f"cpu capability {cap}; int8 GEMM path {cpu_gemm_path()} ({how})"


@functools.lru_cache(maxsize=None)
def cpu_slowdown(dtype: torch.dtype) -> float:
    """How many times slower a `dtype` matmul runs than float32 on this CPU (small probe)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(128, 512, generator=g), torch.randn(512, 512, generator=g)
    a2, b2 = a.to(dtype), b.to(dtype)
    return _best_of(lambda: a2 @ b2) / max(_best_of(lambda: a @ b), 1e-9)


def _forced(var: str, paths: tuple[str, ...]) -> str | None:
    """The GEMM path an environment variable forces (None: measure)."""
    forced = os.environ.get(var)
    if forced and forced not in paths:
        from ..errors import OutlierqError
        raise OutlierqError(f"{var}={forced!r}: choose one of {', '.join(paths)}")
    return forced or None


def _best_of(fn, reps: int = 3) -> float:
    """Fastest of `reps` timed calls after one warm-up (a probe, not a benchmark)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
