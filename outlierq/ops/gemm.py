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


@functools.lru_cache(maxsize=None)
def cpu_gemm_path() -> str:
    forced = os.environ.get("OUTLIERQ_INT8_GEMM")
    if forced:
        if forced not in PATHS:
            from ..errors import OutlierqError
            raise OutlierqError(f"OUTLIERQ_INT8_GEMM={forced!r}: choose one of {', '.join(PATHS)}")
        return forced
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-127, 128, (128, 512), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (512, 512), dtype=torch.int8, generator=g)
    wf = w.float()
    return "int_mm" if _best_of(lambda: torch._int_mm(x, w)) <= _best_of(lambda: x.float() @ wf) else "fp32"


def gemm_operand(wq_t: torch.Tensor) -> torch.Tensor:
    """The weight operand [K, N] in the form this device's GEMM wants: int8 codes for the int8
    GEMM, the same codes as fp32 where that is faster (4x the memory of int8, the float model's)."""
    if wq_t.is_cuda or cpu_gemm_path() == "int_mm":
        return wq_t.contiguous()
    return wq_t.float().contiguous()


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


def _best_of(fn, reps: int = 3) -> float:
    """Fastest of `reps` timed calls after one warm-up (a probe, not a benchmark)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
