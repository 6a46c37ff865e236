"""Keep freed memory in the process (glibc): training allocates the same large tensors every step.

glibc serves large allocations (>= 128 KiB, up to 32 MiB adaptively) with fresh mmap'd pages and gives them
back on free, so every step pays a page fault per 4 KiB of every large activation and gradient: on this
project's CPU VMs a fresh 64 MiB head gradient costs ~200 ms to zero-fill, and a `small` training step runs
~10% faster once freed memory is reused (docs/LOG.md). `M_MMAP_MAX = 0` takes large blocks from the heap
and a high `M_TRIM_THRESHOLD` keeps the heap from shrinking, so the second step reuses the first step's
pages. The price: the process keeps its peak memory until it exits (the peak itself does not change). The
training commands (`train`, `sft`, `rl`, `distill`, `demo`) call this; library code and the server do not.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Apply the two settings where glibc's mallopt exists; returns whether it did."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
