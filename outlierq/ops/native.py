"""The CPU kernels of cpu_kernels.c: one read of each row instead of the torch twins' several
eager passes per chunk (measured side by side in `outlierq bench kernels`).

Why plain C through ctypes rather than a torch C++ extension: an extension compiles torch's
headers (over a minute on 2 cores, again for every torch version), while this file needs only a C
compiler and builds in about a second, once per machine, into the outlierq cache (keyed by the
source, the compiler and the CPU's flags, since it is built for this CPU with -march=native).
Threads: ctypes releases the GIL, so row blocks run on a small Python thread pool, no second
OpenMP runtime beside torch's. Sums add in a fixed order of row parts whatever the thread count,
so one process with 2 threads and two processes with 1 get the same bits.

Where no compiler is found, or $OUTLIERQ_NATIVE=0, `available()` is False and ops uses the torch
twins. `scripts/setup.sh` builds the library so that neither tests nor calibration pay for it."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from . import torch_ops

_SRC = Path(__file__).with_name("cpu_kernels.c")
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-strict-aliasing", "-fPIC", "-shared"]
# Row parts per call: fixed (not the thread count) so sums add in the same order everywhere.
_PARTS = 8
_BLOCK_ROWS = 8  # ROWS in cpu_kernels.c: each thread's scratch holds that many float32 rows
_MIN_PART = 1 << 18  # elements per part at least: a thread handoff costs tens of us
_EPS32 = float(torch.tensor(1e-12, dtype=torch.float32))  # torch_ops._EPS as the twin's clamp holds it
_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _cpu_key() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return flags


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def library_path() -> Path:
    from ..cache import cache_dir

    cc = _compiler() or "none"
    key = hashlib.sha256("\0".join([_SRC.read_text(), cc, " ".join(_FLAGS), _cpu_key(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir("native") / f"cpu_kernels-{key}.so"


def build(path: Path | None = None) -> Path:
    """Compile cpu_kernels.c for this CPU into the cache, unless a library sealed by an earlier
    build is there intact (outlierq.cache: ours alone, its bytes as built). A half-written,
    truncated, altered or planted file is never loaded: it is built again over it."""
    from ..cache import seal, verified

    path = path or library_path()
    if verified(path):
        return path
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *_FLAGS, str(_SRC), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, path)
        seal(path)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cc} failed: {e.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


_SIGNATURES = {"channel_stats_rows": [_P, ctypes.c_int, _I64, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P],
               "quant_token_rows": [_P, ctypes.c_int, _I64, _I64, _I64, _I64, _P, _P, _P, _P, _P],
               "quant_tensor_rows": [_P, ctypes.c_int, _I64, _I64, _I64, _I64, _P, _F32, _P, _P],
               "fp8_rows": [_P, ctypes.c_int, _I64, _I64, _I64, _I64, ctypes.c_int, _F32, _P, _P, _P]}


@functools.lru_cache(maxsize=None)
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("OUTLIERQ_NATIVE", "1") == "0" or platform.machine() not in ("x86_64", "AMD64", "aarch64"):
        return None
    from ..errors import OutlierqError

    try:
        lib = ctypes.CDLL(str(build()))
        for name, args in _SIGNATURES.items():
            f = getattr(lib, name)  # (AttributeError: a library without the symbol)
            f.argtypes, f.restype = args, None
    except (RuntimeError, OSError, AttributeError, subprocess.TimeoutExpired, OutlierqError) as e:
        # e.g. no compiler, a cache that is not ours alone
        print(f"outlierq: native CPU kernels unavailable ({e}); using the torch twins", file=sys.stderr)
        return None
    return lib


def available() -> bool:
    """True where the native kernels are built and loaded (CPU tensors of float32/bf16/fp16)."""
    return _lib() is not None


def serves(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() == 2 and x.stride(1) == 1
            and available())


@functools.lru_cache(maxsize=4)
def _pool(n: int, pid: int) -> ThreadPoolExecutor:  # per process: a forked child has no threads
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="outlierq-native")


def _parts(m: int, n: int) -> list[tuple[int, int]]:
    p = max(1, min(_PARTS, m, (m * n) // _MIN_PART))
    step = -(-m // p)
    return [(s, min(s + step, m)) for s in range(0, m, step)]


_local = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """This thread's reused float32 scratch of at least `n` elements (each call is done with it
    before it returns): one allocation fewer per call, which a batch-1 decode step makes 200 times."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _local.buf = torch.empty(n, dtype=torch.float32)
    return buf


def _run(fn, parts: list[tuple[int, int]], n: int) -> None:
    """fn(part index, r0, r1, buf pointer) for every part: the parts split into contiguous groups,
    one per thread (one handoff per helper thread; the caller runs the first group). A single
    part (every decode-sized call) runs right here: no pool, no per-call buffer."""
    if len(parts) == 1:
        fn(0, *parts[0], _scratch(_BLOCK_ROWS * n).data_ptr())
        return
    threads = min(torch.get_num_threads(), len(parts))
    bufs = torch.empty(threads, _BLOCK_ROWS * n, dtype=torch.float32)

    def group(g: int) -> None:
        for i in range(g * len(parts) // threads, (g + 1) * len(parts) // threads):
            fn(i, *parts[i], bufs[g].data_ptr())

    futs = [_pool(threads - 1, os.getpid()).submit(group, g) for g in range(1, threads)]
    group(0)
    for f in futs:
        f.result()


def _src(x: torch.Tensor) -> tuple[int, int, int]:
    """(address, dtype code, row stride) of x as the C functions take them."""
    return x.data_ptr(), _DTYPES[x.dtype], x.stride(0)


def _inverse(smooth: torch.Tensor | None) -> torch.Tensor | None:
    """1 / smooth in float32, as the twins multiply by it (kept alive by the caller)."""
    return None if smooth is None else smooth.float().reciprocal().contiguous()


def _profiled(name: str):
    """Names the call in torch.profiler tables (a ctypes call is not an aten op and would be
    invisible there), only while a profiler records: record_function costs ~15 us per call even
    with none running (measured on a Xeon), more than quantizing one decode row takes."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


# Same contracts and results as the twins in torch_ops (sums to float32 rounding); an empty x
# goes to the twin, which already returns the right empty or zero tensors.
def channel_stats(x: torch.Tensor, thresholds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if x.shape[0] == 0:
        return torch_ops.channel_stats(x, thresholds)
    with _profiled("outlierq::native_channel_stats"):
        return _channel_stats(x, thresholds)


def quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None = None,
                       want_col_absmax: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if x.shape[0] == 0:
        return torch_ops.quantize_per_token(x, smooth, want_col_absmax)
    with _profiled("outlierq::native_quantize_per_token"):
        return _quantize_per_token(x, smooth, want_col_absmax)


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] == 0:
        return torch_ops.quantize_per_tensor(x, scale, smooth)
    with _profiled("outlierq::native_quantize_per_tensor"):
        return _quantize_per_tensor(x, scale, smooth)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """torch_ops.quantize_fp8's codes, as their exact float32 values (what the fp32 GEMM path
    multiplies, so no conversion to float8 and back), and scales. On an AMD EPYC (AVX-512) a
    SmolLM2 FP8 evaluation ran ~8% faster with it; the conversions weighed more on a Xeon's profile."""
    if x.shape[0] == 0:
        q, s = torch_ops.quantize_fp8(x, scale)
        return q.float(), s
    with _profiled("outlierq::native_quantize_fp8"):
        return _quantize_fp8(x, scale)


def _channel_stats(x: torch.Tensor, thresholds: torch.Tensor):
    m, n = x.shape
    thr = thresholds.to(torch.float32).contiguous()
    t = thr.numel()
    parts = _parts(m, n)
    colmax = torch.empty(len(parts), n)
    colsum = torch.empty(len(parts), n)
    counts = torch.empty(len(parts), t, n, dtype=torch.int32)
    rowmax = torch.empty(m)
    lib, (xp, dt, s) = _lib(), _src(x)

    def one(i, r0, r1, buf):
        lib.channel_stats_rows(xp, dt, s, r0, r1, n, thr.data_ptr(), t, colmax[i].data_ptr(),
                               colsum[i].data_ptr(), counts[i].data_ptr(), rowmax.data_ptr(), buf)

    _run(one, parts, n)
    if len(parts) == 1:
        return colmax[0], colsum[0], counts[0], rowmax
    # amax/sum over the parts axis propagate NaN and add in part order
    return colmax.amax(0), colsum.sum(0), counts.sum(0, dtype=torch.int32), rowmax


def _quantize_per_token(x: torch.Tensor, smooth: torch.Tensor | None, want_col_absmax: bool):
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.int8)
    scales = torch.empty(m)
    parts = _parts(m, n)
    col = torch.empty(len(parts), n) if want_col_absmax else None
    inv_s = _inverse(smooth)
    lib, (xp, dt, s), isp = _lib(), _src(x), None if inv_s is None else inv_s.data_ptr()

    def one(i, r0, r1, buf):
        lib.quant_token_rows(xp, dt, s, r0, r1, n, isp, q.data_ptr(), scales.data_ptr(),
                             None if col is None else col[i].data_ptr(), buf)

    _run(one, parts, n)
    return q, scales, None if col is None else col.amax(0)


def _quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None):
    m, n = x.shape
    q = torch.empty(m, n, dtype=torch.int8)
    # The twin's float32 clamp and reciprocal, in Python floats (three tensor ops cost a decode
    # row ~13 us): 1/x in double then rounded to float32 (ctypes) is the correctly rounded float32
    # quotient, since 53 >= 2 * 24 + 2 bits makes the double rounding innocuous.
    sf = float(scale) if scale.numel() == 1 else float(scale.reshape(-1)[0])
    inv = 1.0 / max(sf, _EPS32) if sf == sf else sf
    inv_s = _inverse(smooth)
    lib, (xp, dt, s), isp = _lib(), _src(x), None if inv_s is None else inv_s.data_ptr()

    def one(i, r0, r1, buf):
        lib.quant_tensor_rows(xp, dt, s, r0, r1, n, isp, inv, q.data_ptr(), buf)

    _run(one, _parts(m, n), n)
    return q


def _quantize_fp8(x: torch.Tensor, scale: torch.Tensor | None):
    m, n = x.shape
    q = torch.empty(m, n)
    scales = torch.empty(m)
    sf = 0.0 if scale is None else float(scale.reshape(-1)[0])  # (float32 already: exact)
    lib, (xp, dt, s) = _lib(), _src(x)

    def one(i, r0, r1, buf):
        lib.fp8_rows(xp, dt, s, r0, r1, n, scale is None, sf, q.data_ptr(), scales.data_ptr(), buf)

    _run(one, _parts(m, n), n)
    return q, scales
