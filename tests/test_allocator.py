"""baton/allocator.py: with freed memory kept, a large tensor comes from glibc's heap, not from fresh pages."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# In a process of its own (the thresholds are the whole process's): the bytes glibc has mapped for allocations
# of their own (mallinfo2's hblkhd) while a 48 MB tensor lives, after `baton --malloc-keep-bytes N` set them.
PROBE = """
import ctypes, sys
from baton.allocator import keep_freed_memory
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS.split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
print(keep_freed_memory(int(sys.argv[1])))
import torch
t = torch.empty(12 << 20)  # 48 MB
print(libc.mallinfo2().hblkhd >= t.numel() * 4)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize(("keep", "expected"), [(1 << 30, ["True", "False"]), (0, ["False", "True"])])
def test_large_tensors_come_from_the_heap_when_freed_memory_is_kept(keep: int, expected: list[str]) -> None:
    out = subprocess.run([sys.executable, "-c", PROBE, str(keep)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == expected  # [thresholds set, the tensor in pages mapped for it alone]


def test_the_cli_keeps_freed_memory_by_default() -> None:
    from baton.allocator import KEEP_BYTES
    from baton.cli import build_parser

    assert build_parser(["health"]).parse_args(["health"]).malloc_keep_bytes == KEEP_BYTES
