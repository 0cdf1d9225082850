"""Keep freed host memory inside the process, so CPU training steps stop page-faulting.

PyTorch's CPU tensors come from the C library's malloc.  glibc serves large blocks with fresh
``mmap`` pages and gives freed memory back to the kernel, so every training step faults in all
of its activations again, pages the kernel must zero first (the page faults per step and
what they cost are measured on the benchmarks page of the docs, docs/benchmarks.md).
Raising glibc's mmap and trim thresholds keeps freed blocks in the heap for the next step, as
the caching allocators jemalloc and tcmalloc do (and as PyTorch's CUDA allocator does on GPUs).
The cost: the process holds on to its peak memory instead of returning it between steps.

Only glibc (Linux) is tuned; elsewhere :func:`keep_freed_memory` changes nothing and returns False.
The setting is process-wide and stays for the life of the process.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, not from fresh mmap pages
TRIM_THRESHOLD = 2**31 - 1  # give memory back only when 2 GiB lie free at the top of the heap (mallopt takes an int)

_applied = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse (idempotent); True if the process now does."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD,
                                                                                          TRIM_THRESHOLD))
    return _applied
