"""
Peak resident memory of a CPU run and glibc's heap, an option (train.py --mmap_threshold_mb). Freed
tensors of up to glibc's mmap threshold go back to its heap, not to the system, and that threshold
grows by itself up to 32 MB once large blocks have been freed: after the first steps almost every
activation lives in a heap that does not shrink, and the process's peak RSS sits above the peak of
its live tensors. A fixed threshold (say 1 MB; setting one also stops the growth) gives larger
blocks their own mappings, returned to the system when freed, and the next step pays page faults
to map them again.

Measured on 2 cores of an AMD EPYC (bench.py, ours-mmap against ours-learnable, 2026-12-08; README
"Performance"): 1 MB gave 0.76 GB less peak RSS in fp32 (4.62 -> 3.86 GB) and 0.29 GB less in
bf16, for a step 1.35x (fp32) and 1.38x (bf16) slower. So it is off by default: for runs that must
fit a machine's memory.
"""

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)


def set_mmap_threshold(megabytes: float) -> bool:
    """Serve allocations of >= megabytes from their own mappings (glibc's mallopt), so that freed
    activations leave the process. 0: leave glibc's default. Returns whether the setting applied
    (Linux with glibc; elsewhere nothing changes)."""
    if megabytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(megabytes * (1 << 20))))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
