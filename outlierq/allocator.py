"""glibc allocator settings, the one place outlierq touches them (no-ops where libc is not glibc).

The layer-by-layer pipeline returns each freed layer to the system and keeps large activations
out of the heap (peak memory); the kernel bench does the opposite, keeping freed memory for reuse
so that timings do not include re-faulting fresh output pages."""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None
    except OSError:  # not glibc (macOS, musl)
        return None


_LIBC = _libc()


def trim() -> None:
    """Hand the heap's free memory back to the system (malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def mmap_threshold(nbytes: int) -> bool:
    """Allocations of `nbytes` and more get their own mapping, unmapped when freed. True if set."""
    return _LIBC is not None and bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes))


def keep_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it: freed memory is reused as is."""
    return mmap_threshold(1 << 30) and bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, 1 << 31))
