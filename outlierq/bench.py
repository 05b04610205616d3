"""`outlierq bench kernels`: time each op's backends against naive torch eager on one device.

Bytes moved (the formula behind GB/s): channel_stats reads M*N*elem; quant_token reads M*N*elem and
writes M*N int8 codes + 4*M scale bytes; quant_tensor reads M*N*elem and writes M*N; quant_fp8
(per-token FP8 E4M3) as quant_token, but the native backend writes its codes as float32 (4*M*N:
what the CPU's fp32 GEMM multiplies). Peak bandwidth
is measured here with a large device copy (read + write counted), timed again before each shape and
dtype so each row is compared with the bandwidth of its own moment; known GPUs also get the spec.

Backends: eager (what a user writes without outlierq), torch (the chunked twins), native (the C
kernels, CPU), compiled (torch.compile of the eager code; opt-in, first call = compile time),
triton (CUDA, or the interpreter). On CPU the bench asks glibc to keep freed memory for reuse
(as a caching allocator does): otherwise every call re-faults its fresh output pages — 8192x4096
int8 codes cost ~10 ms of page faults here, more than the kernel — and the copy that sets the
peak writes into a reused buffer. The `allocator` column says which ran."""
from __future__ import annotations

import csv
import io
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from . import allocator, ops
from .errors import OutlierqError
from .provenance import atomic_path, stamp

OPS = ("channel_stats", "quant_token", "quant_tensor", "quant_fp8")
SPEC_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}
_DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_THR = (6.0,)


def _eager(op: str) -> Callable:
    """The naive torch baselines: what a user writes without outlierq."""
    def channel_stats(x, thr):
        a = x.abs().float()
        return a.amax(0), a.sum(0), torch.stack([(a > t).sum(0) for t in thr]), a.amax(1)

    def quant_token(x, _):
        xf = x.float()
        amax = xf.abs().amax(1, keepdim=True).clamp(min=1e-12)
        return (xf * (127.0 / amax)).round().clamp(-127, 127).to(torch.int8), amax / 127

    def quant_tensor(x, scale):
        return (x.float() * (1.0 / scale)).round().clamp(-127, 127).to(torch.int8)

    def quant_fp8(x, _):
        xf = x.float()
        s = xf.abs().amax(1, keepdim=True).clamp(min=1e-12) / 448
        return (xf / s).clamp(-448, 448).to(torch.float8_e4m3fn), s

    return {"channel_stats": channel_stats, "quant_token": quant_token,
            "quant_tensor": quant_tensor, "quant_fp8": quant_fp8}[op]


def _impl(op: str, backend: str) -> Callable:
    if backend == "eager":
        return _eager(op)
    if backend == "compiled":
        return torch.compile(_eager(op), dynamic=False)
    if op == "channel_stats":
        return lambda x, a: ops.channel_stats(x, _THR, backend=backend)
    if op == "quant_token":
        return lambda x, a: ops.quantize_per_token(x, backend=backend)
    if op == "quant_fp8":
        return lambda x, a: ops.quantize_fp8(x, backend=backend)
    return lambda x, a: ops.quantize_per_tensor(x, a, backend=backend)


def _bytes(op: str, m: int, n: int, elem: int, backend: str) -> int:
    code = 4 if op == "quant_fp8" and backend == "native" else 1
    return {"channel_stats": m * n * elem, "quant_token": m * n * elem + m * n + 4 * m,
            "quant_tensor": m * n * elem + m * n, "quant_fp8": m * n * elem + m * n * code + 4 * m}[op]


def _time(fn: Callable, device: str, budget_s: float, min_reps: int = 5) -> tuple[list[float], float]:
    """Repeat timings after warm-up, and the first call's time (a compile, for `compiled`)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - t0
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times, first


def measured_peak_gbps(device: str) -> float:
    """Copy bandwidth of a 256 MiB buffer (bytes read + written), median of repeats."""
    src = torch.empty(64 * 1024 * 1024, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = statistics.median(_time(lambda: dst.copy_(src), device, 1.0)[0])
    return 2 * src.numel() * 4 / t / 1e9


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(q * len(s)))]


def _check_memory(shapes: list[tuple[int, int]], dtypes: list[str], device: str) -> None:
    """Refuse shapes that cannot fit before allocating anything: each measurement holds the input,
    an fp32 copy and the int8 codes (about 9 bytes per element for fp32 inputs)."""
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for m, n in shapes:
        need = m * n * (4 + 4 + 1) * (2 if any(d != "fp32" for d in dtypes) else 1)
        if need > 0.8 * free:
            raise OutlierqError(f"shape {m}x{n} needs about {need / 2**30:.1f} GiB; {free / 2**30:.1f} "
                                f"GiB are free on {device}: choose smaller --shapes")


def is_bench_table(path: Path) -> bool:
    """A kernels table `outlierq bench` wrote (its header), so --out never replaces a user's file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("op,backend,M,N,dtype,")
    except (OSError, UnicodeDecodeError):
        return False


def bench_kernels(ops_: list[str], shapes: list[tuple[int, int]], dtypes: list[str], device: str,
                  out_dir: str | Path, budget_s: float = 1.0, compiled: bool = False) -> list[dict]:
    """Time every backend of each op at each shape and dtype; write <out_dir>/kernels_<device>.csv.
    On CPU this changes the calling process's glibc malloc settings (see the module docstring):
    run it in a process of its own, as `outlierq bench` does."""
    if device == "cuda" and not torch.cuda.is_available():
        raise OutlierqError("--device cuda but no GPU is visible; use --device cpu")
    for o in ops_:
        if o not in OPS:
            raise OutlierqError(f"unknown op {o!r}; choose from {', '.join(OPS)}")
    _check_memory(shapes, dtypes, device)
    backends = (["eager", "torch"] + (["native"] if device == "cpu" and ops.native.available() else [])
                + (["compiled"] if compiled else [])
                + (["triton"] if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else []))
    if device == "cuda":
        alloc = "torch CUDA caching allocator"
    else:
        alloc = "glibc, freed memory reused (mmap threshold 1 GiB)" if allocator.keep_freed_memory() else "system default"
    peaks: list[float] = []
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    spec = next((v for k, v in SPEC_GBPS.items() if k in dev_name), None)
    prov = stamp()
    rows = []
    for (m, n) in shapes:
        for dt in dtypes:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(m, n, generator=g, device=device).to(_DT[dt])
            arg = torch.tensor([x.abs().max().item() / 127], device=device)
            # the copy that sets the peak is timed again before each shape and dtype: on a shared
            # machine the bandwidth drifts (two runs here measured 44 and 78 GB/s)
            peak = measured_peak_gbps(device)
            peaks.append(peak)
            for op in ops_:
                base = None
                for be in backends:
                    fn = _impl(op, be)
                    t, first = _time(lambda: fn(x, arg), device, budget_s)
                    p50 = statistics.median(t)
                    nbytes = _bytes(op, m, n, x.element_size(), be)
                    gbps = nbytes / p50 / 1e9
                    base = p50 if be == "eager" else base
                    rows.append({"op": op, "backend": be, "M": m, "N": n, "dtype": dt,
                                 "p50_ms": p50 * 1e3, "p20_ms": _pct(t, 0.2) * 1e3,
                                 "p80_ms": _pct(t, 0.8) * 1e3, "reps": len(t), "bytes": nbytes,
                                 "GBps": gbps, "pct_measured_peak": 100 * gbps / peak,
                                 "pct_spec_peak": 100 * gbps / spec if spec else "",
                                 "speedup_vs_eager": base / p50, "first_call_ms": first * 1e3,
                                 "measured_peak_GBps": peak, "allocator": alloc,
                                 "device": dev_name, "torch": prov["versions"].get("torch"),
                                 "triton": prov["versions"].get("triton", ""),
                                 "git_sha": prov["git_sha"], "timestamp": prov["timestamp"],
                                 "torch_threads": torch.get_num_threads(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "int8_gemm": "cuda int8" if device == "cuda" else ops.gemm.cpu_gemm_path()})
                    print(f"{op:14s} {be:8s} {m:6d}x{n:<6d} {dt:5s} p50 {p50 * 1e3:9.3f} ms "
                          f"{gbps:8.1f} GB/s {100 * gbps / peak:5.1f}% of measured peak "
                          f"{base / p50:6.2f}x eager", flush=True)
    out = Path(out_dir) / f"kernels_{device}.csv"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with atomic_path(out) as tmp:
        tmp.write_text(buf.getvalue())
    print(f"measured peak {min(peaks):.1f}-{max(peaks):.1f} GB/s (copy, before each shape and dtype)"
          f"{'; spec ' + str(spec) + ' GB/s' if spec else ''}; "
          f"{ops.gemm.describe()}; wrote {out}")
    return rows
