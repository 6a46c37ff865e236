"""glibc's allocator told to keep freed memory for reuse, for the whole process (a command's start-up setting).

glibc hands blocks above its mmap threshold (32 MiB at most) back to the kernel when they are freed, and
PyTorch's CPU allocator caches nothing, so a large tensor allocated every training step (a weight gradient, a
chunk of logits) is fresh memory every step and each of its pages faults on first touch: at a 49k x 768
vocabulary that was 0.6 s of a 3.6 s step (docs/LOG.md). With M_MMAP_MAX = 0 (no mmap) and M_TRIM_THRESHOLD =
2^31 - 1 (no trimming) freed blocks stay in the heap and the next step's tensors reuse them.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Set glibc's M_MMAP_MAX = 0 and M_TRIM_THRESHOLD = 2^31 - 1; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
