"""The C allocator under PyTorch's CPU tensors: keep freed memory in the process rather than hand it back.

glibc serves an allocation above its mmap threshold (128 KiB, raised as such blocks are freed, to 32 MiB at most)
with fresh pages from the kernel, and returns the top of its heap to the kernel once more than its trim threshold
is free; either way the next tensor of that size faults every page in again, each zero-filled by the kernel. A
decode worker allocates tensors of tens of MB at every prefill and splice (a prefix's KV from the prefix cache:
49 MB for 1,024 tokens of smollm2-135m), and faulting them in costs about ten times the copy that fills them (a
49 MB concatenation: 22.5 ms, 2.6 ms with both thresholds at 1 GiB; machine H in docs/benchmarks.md). PyTorch's
CPU performance guide names the same cost and advises jemalloc or tcmalloc through LD_PRELOAD; glibc's `mallopt`
does the same from inside the process, with nothing to install or preload. What it costs: memory freed stays the
process's, so its resident size follows its peak.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # the default: allocations under 1 GiB come from the heap, and up to 1 GiB free stays there
MALLOC_KEEP_HELP = ("bytes of freed memory glibc keeps for the next allocations instead of returning it to the "
                    "kernel, which would zero-fill it again (baton/allocator.py); 0: glibc's defaults")


def keep_freed_memory(limit: int = KEEP_BYTES) -> bool:
    """Set glibc's mmap and trim thresholds to `limit` bytes for this process (0: leave glibc's defaults). False
    where that cannot be done (not glibc) or glibc refuses the value; the allocator is then left as it was."""
    if limit <= 0 or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    limit = min(limit, 2**31 - 1)  # mallopt takes a C int
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))
