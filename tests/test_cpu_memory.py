"""`keep_freed_memory`: large tensors come from malloc's heap instead of fresh mmaps."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moekit.cpu_memory import _glibc

# Prints how many bytes of mmapped blocks (mallinfo2's hblkhd) allocating a 64 MiB tensor adds.
PROBE = """
import ctypes, ctypes.util, sys, torch
from moekit.cpu_memory import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)
print(libc.mallinfo2().hblkhd - before)
"""


def mmapped_bytes(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(_glibc() is None, reason="malloc settings are glibc's")
def test_large_tensors_come_from_the_heap_after_keep_freed_memory():
    assert mmapped_bytes("default") >= 64 * 2**20  # glibc's default: the tensor is its own mmap
    assert mmapped_bytes("keep") == 0  # served from the heap, reusable after free
