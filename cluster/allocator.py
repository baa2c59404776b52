"""Keep the memory an engine frees between steps inside the process (glibc), instead of returning it each time.

A CPU engine allocates and frees the same large temporaries (attention scores, activations) on every step. glibc
serves allocations above its mmap threshold with fresh mmaps and trims freed heap tops back to the kernel, so each
step page-faults the same memory in again: measured on a node's engine thread at ~900 tokens of context, 5,000 page
faults per decode token and twice the step time of the same step in a single-threaded process (whose threshold had
adapted). Raising both thresholds once at start makes every step reuse the memory. No-op where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 1 << 30
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's maximum; larger blocks (KV pools, weights) still get their own mmap


def keep_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; False where that is not possible."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    )
