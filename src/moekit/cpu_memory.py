"""Reuse freed CPU memory instead of returning it to the kernel (glibc malloc settings).

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh `mmap`
and unmaps it on free. A training step on CPU allocates and frees many such buffers (an MoE layer's
expert-sorted rows are (T * k, D): 64 MiB at T=4096, k=8, D=512, float32), so each one is
page-faulted in anew, step after step. A page fault per 4 KiB costs about as much as the
arithmetic on the page: measured on 2 cores, `a * w` into a fresh 64 MiB tensor takes 30 ms, into an
existing one 5 ms. One MoE layer's forward+backward at (E=64, k=8, F=128, T=4096, D=512), timed
against the dense FFN of equal FLOPs in the same process: 1.45-1.55 x dense with glibc's defaults,
1.20-1.29 x with `keep_freed_memory()` (benchmarks/moe_layer.py with and without `--malloc glibc`,
and two alternating standalone runs of each; absolute times on the shared 2-core machine varied by
up to 40% between processes, the ratios far less).

`keep_freed_memory()` makes malloc serve all sizes from its heap (`M_MMAP_MAX = 0`) and keep freed
heap memory (`M_TRIM_THRESHOLD` at its maximum): what the CUDA caching allocator does on GPU and
what jemalloc or tcmalloc (the usual `LD_PRELOAD` advice for PyTorch on CPU) do, with no dependency.
The cost: the process's resident memory stays at its peak instead of shrinking after a large
free. The training commands (`moekit train`, `demo`, `experiment`) and the speed benchmarks call
it; library code never does, so an application that embeds moekit keeps its own malloc settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Iterable

from torch import Tensor, nn

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
M_MMAP_MAX = -4
TRIM_THRESHOLD_MAX = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory for reuse (see the module docstring). Affects
    allocations made after the call. Returns False, changing nothing, where the C library is not
    glibc (macOS, musl, Windows)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)
    )


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


MADV_HUGEPAGE = 14  # <sys/mman.h>
MADV_COLLAPSE = 25  # Linux 6.1+
HUGE_PAGE = 2 * 2**20


def use_huge_pages(tensors: Iterable[Tensor] | nn.Module) -> int:
    """Back the CPU tensors' memory (a module's: its parameters and buffers, where a quantized
    model keeps its weights) with 2 MiB transparent huge pages, now (Linux 6.1+ `MADV_COLLAPSE`,
    where the system's THP setting is `always` or `madvise`): the whole 2 MiB pages inside each
    tensor, in place, values unchanged. Returns the bytes of the ranges now wholly on huge pages
    (collapsed, or huge already; a range only partly collapsed counts 0: a lower bound), 0 where
    unsupported (on a kernel without MADV_COLLAPSE the MADV_HUGEPAGE advice stays, which only lets
    the kernel's background khugepaged collapse those pages later). A collapse needs free 2 MiB
    blocks: on a machine whose memory the model and the page cache fill, few are found
    (big_model.py: 0.3-0.9 of 14-19 GB); `advise_huge_pages` before the memory is first touched
    does not need them.

    Decoding streams every weight matrix once per token; with 4 KiB pages that is a page-table
    walk every 4 KiB. On the decode benchmark's 213M-parameter model (2 cores), collapsing the
    parameters' pages raised moekit's batch-1 decode from 51 to 58 tokens/s and batch 8 from 150
    to 170, in one standalone run each; `benchmarks/decode.py` applies it to every model it
    times. `moekit generate` calls it on the model; library code never does."""
    return _advise(tensors, MADV_HUGEPAGE, MADV_COLLAPSE)


def advise_huge_pages(tensors: Iterable[Tensor] | nn.Module) -> int:
    """Ask for 2 MiB transparent huge pages (`MADV_HUGEPAGE`) for the whole 2 MiB pages inside
    the CPU tensors not yet touched (allocated uninitialised): their first touch then faults in
    huge pages, which the kernel makes room for (compacting or reclaiming the page cache where the
    THP defrag setting allows it for advised memory, its default: loading can then wait on
    compaction; big_model.py's loads took 23.6 and 15.5 s with it against 20.6 and 15.5 before).
    For weights allocated to be loaded, as `moekit.quant.files.empty_quantized_model` allocates a
    quantized model; memory malloc serves from its heap (after `keep_freed_memory`, as the training
    commands set it) may be touched already and gains nothing. Returns the bytes advised (0 without
    glibc on Linux)."""
    return _advise(tensors, MADV_HUGEPAGE)


def _advise(tensors: Iterable[Tensor] | nn.Module, *advice: int) -> int:
    """`madvise` each `advice` in turn over the whole 2 MiB pages inside each CPU tensor's
    storage (each once), stopping at a span's first failure; the bytes of the spans every one
    succeeded on (0 without glibc on Linux)."""
    libc = _glibc()
    if libc is None:
        return 0
    if isinstance(tensors, nn.Module):
        tensors = [*tensors.parameters(), *tensors.buffers()]
    done, seen = 0, set()
    for t in tensors:
        storage = t.untyped_storage()
        begin = storage.data_ptr()
        if t.device.type != "cpu" or begin in seen:
            continue
        seen.add(begin)
        start = -(-begin // HUGE_PAGE) * HUGE_PAGE
        end = (begin + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
        if end > start and all(libc.madvise(start, end - start, a) == 0 for a in advice):
            done += end - start
    return done


__all__ = ["advise_huge_pages", "keep_freed_memory", "use_huge_pages"]
