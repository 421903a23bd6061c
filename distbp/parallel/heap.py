"""The rank's heap: the memory a training step frees kept for the next step instead of handed back to the kernel.

Every step allocates and frees the same activations. glibc's malloc serves an array above its mmap
threshold (128 KB, raised on each free up to 32 MB) with fresh pages from the kernel, and hands the
top of its heap back once more than its trim threshold (twice that) is free there, so a step's
activations were faulted in and zero-filled by the kernel again every step: W5 took ~1,100 page
faults and 2-4 ms of system time per 40 ms step at one thread, up to 10 ms at two. Fixing both
thresholds (the mmap one at its 64-bit maximum) keeps the freed memory in the heap for the next
step; the peak stays the peak. PyTorch's CPU tuning guide gets the same by preloading jemalloc or
tcmalloc. A user's MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ stands; without glibc nothing changes.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: arrays up to 32 MB come from the heap, larger ones from mmap
TRIM_THRESHOLD = 1 << 30  # free memory at the heap's top kept up to this many bytes
USER_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; False when the user set them or there is no glibc."""
    if any(os.environ.get(k) for k in USER_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS has no mallopt; musl's returns 0)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
