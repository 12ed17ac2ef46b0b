"""`keep_freed_memory`: large tensors come from malloc's heap instead of fresh mmaps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_use_huge_pages_collapses_in_place() -> None:
    import torch

    from moekit.cpu_memory import HUGE_PAGE, use_huge_pages

    _needs_huge_pages()
    x = torch.randn(4 * HUGE_PAGE // 4 + 123)
    expected = x.clone()
    collapsed = use_huge_pages([x, x[7:], torch.ones(3), torch.empty(5, device="meta")])
    assert collapsed >= 3 * HUGE_PAGE  # the whole 2 MiB pages inside x, once
    assert torch.equal(x, expected)
    assert _anon_huge_bytes(x) >= 3 * HUGE_PAGE


def _needs_huge_pages() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if _glibc() is None or not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("no glibc, or transparent huge pages are off on this system")


def _anon_huge_bytes(x) -> int:
    """Bytes of huge pages in the mappings that hold tensor x (/proc/self/smaps)."""
    huge_kb = 0
    begin, end = x.data_ptr(), x.data_ptr() + x.nbytes
    region = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            region = lo < end and hi > begin
        elif region and line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
    return huge_kb * 1024


def test_use_huge_pages_of_a_module_covers_its_buffers() -> None:
    """A quantized model keeps its weights in buffers: `use_huge_pages(module)` (what `moekit
    generate` calls) collapses them too, not only the parameters."""
    import torch
    from torch import nn

    from moekit.cpu_memory import HUGE_PAGE, use_huge_pages

    _needs_huge_pages()
    module = nn.Module()
    module.register_buffer("weight_data", torch.zeros(3 * HUGE_PAGE, dtype=torch.uint8))
    module.p = nn.Parameter(torch.zeros(3 * HUGE_PAGE // 4))
    assert use_huge_pages(module) >= 4 * HUGE_PAGE  # 2 whole pages inside each, at least


def test_advised_memory_faults_in_huge_pages() -> None:
    """Memory advised before its first touch (as a quantized model is allocated to be loaded)
    comes in 2 MiB pages when touched: no collapse needed. In a fresh process: one whose malloc
    serves large tensors from its heap (after `keep_freed_memory`) may hand back touched pages."""
    _needs_huge_pages()
    code = """if True:
        import torch
        from tests.test_cpu_memory import _anon_huge_bytes
        from moekit.cpu_memory import HUGE_PAGE, advise_huge_pages
        x = torch.empty(8 * HUGE_PAGE, dtype=torch.uint8)
        assert advise_huge_pages([x]) >= 7 * HUGE_PAGE
        x.fill_(1)
        print(_anon_huge_bytes(x) // HUGE_PAGE)
    """
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 4  # most of it (the kernel may lack a free 2 MiB block)
