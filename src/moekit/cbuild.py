"""moekit's one way to build and call C kernels: compile a C source with the system compiler into
the cache directory (keyed by the hash of the source, the files it includes and the command), load
it with ctypes, warn and fall back to torch where that fails; and `call`, the direct-call-in-eager
dispatch of a kernel registered as a torch op. Used by `moekit.moe_kernels` (the MoE layer's
per-row work), `moekit.inference.decode_kernels` and `decode_glue` (float32 decode products, a
token's attention and MoE layer) and `moekit.quant.kernels` (products over quantized weights).

Why `cc` and ctypes rather than `torch.utils.cpp_extension` (measured on this project's machine):
cc builds a kernel file in about a second where a minimal C++ op against torch's headers took 62 s
on first use (and needs ninja and a C++ toolchain), to save about 3.5 us a call. The kernels link
with -fopenmp: the libgomp torch has already loaded (same soname), so they share torch's thread
pool and its thread count (torch.set_num_threads).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit.fileio import atomic_path, default_cache_dir

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")
# For large kernel files: quant/kernels.c builds in 10.6 s at -O2 against 18.2 at -O3 on this
# project's machine, and decodes as fast (benchmarks/README.md, Quantized weights).
FLAGS_O2 = ("-O2", *FLAGS[1:])
# For kernels whose sums must round as a reference's do, product by product and add by add: no
# FMA contraction (clang's default, aarch64's, GCC's outside ISO C).
EXACT_FLAGS = (*FLAGS, "-ffp-contract=off")
LIBS = ("-lm",)  # after the source: with --as-needed linkers, a library before it is dropped


def build(source: Path, flags: Sequence[str] = FLAGS) -> Path:
    """The shared library of `source` for this compiler ($CC, else cc, else gcc) and flags,
    compiled once into the cache directory (under a temporary name, then renamed, so concurrent
    first uses are safe; where file locks exist, they wait for one build instead of each compiling
    it: test workers, ranks). Raises OSError without a compiler, CalledProcessError if it fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler")
    command = [compiler, *flags, "{source}", "-o", "{out}", *LIBS]
    key = hashlib.sha256(_with_includes(source) + " ".join(command).encode()).hexdigest()
    path = default_cache_dir() / "kernels" / f"{source.stem}-{key[:16]}.so"
    if not path.exists():
        with _locked(path.with_name(f".{path.name}.lock")):
            if not path.exists():  # another process may have built it while this one waited
                with atomic_path(path) as out:
                    names = {"{source}": str(source), "{out}": str(out)}
                    filled = [names.get(arg, arg) for arg in command]
                    subprocess.run(filled, check=True, capture_output=True, text=True)
    return path


LOCAL_INCLUDE = re.compile(rb'\s*#\s*include\s*"([^"]+)"')  # a line including a file beside it


def _with_includes(source: Path, seen: set[Path] | None = None) -> bytes:
    """The bytes of `source` and, in order, of each file it includes by `#include "name"` (beside
    it, recursively, once each; `<...>` includes are the system's): what the library's cache key
    must cover."""
    seen = set() if seen is None else seen
    seen.add(source.resolve())
    text = source.read_bytes()
    out = [text]
    for line in text.splitlines():
        found = LOCAL_INCLUDE.match(line)
        included = found and (source.parent / found[1].decode()).resolve()
        if included and included not in seen:
            out.append(_with_includes(included, seen))
    return b"".join(out)


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (created if missing) for the block; without fcntl
    (Windows), no lock."""
    if fcntl is None:
        yield
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def load(
    source: Path,
    signatures: dict[str, tuple[list, object]],
    what: str,
    fallback: str,
    flags: Sequence[str] = FLAGS,
) -> ctypes.CDLL | None:
    """`source` built and loaded, each function of `signatures` ({name: (argtypes, restype)})
    typed; None if MOEKIT_NO_KERNELS is set, or (with a RuntimeWarning naming `what` and saying
    that `fallback` runs instead) if it cannot be built or loaded. Callers cache the result."""
    if os.environ.get("MOEKIT_NO_KERNELS"):
        return None
    try:
        library = typed(ctypes.CDLL(str(build(source, flags))), signatures)
    except (OSError, AttributeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(
            f"moekit could not build its {what} ({str(detail).strip()[-300:]}); {fallback} "
            "instead. Install a C compiler with OpenMP (gcc) or set CC; MOEKIT_NO_KERNELS=1 "
            "silences this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return library


def typed(library: ctypes.CDLL, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL:
    """`library` with each function of `signatures` ({name: (argtypes, restype)}) typed;
    AttributeError if one is missing."""
    for name, (argtypes, restype) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


def call(kernel: Callable, op, *args):
    """`kernel(*args)` directly in eager decoding, through its torch op `op` (same function) when
    `torch.compile` traces or a profiler records: the op's dispatch and the checks cost ~25 us a
    call where the direct call with the checks costs ~10, and a batch-1 decode token makes ~60
    calls (1.42x transformers with every call through the op; benchmarks/README.md)."""
    if torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled():
        return op(*args)
    return kernel(*args)


_PLAIN = (Tensor, nn.Parameter)


def plain_cpu(t: Tensor, dtype: torch.dtype) -> bool:
    """A CPU tensor of `dtype` whose data pointer is its data: not meta, not a functorch wrapper,
    not a subclass (a FakeTensor is "cpu" too, with no memory behind it). While torch.compile
    traces, a plain tensor's kernel runs through its torch op (`call`), whose fake implementation
    tracing reads; the functorch test, which dynamo cannot trace (it fell back to eager for the
    whole forward), is left out there."""
    return (
        type(t) in _PLAIN
        and t.is_cpu  # 5x cheaper than t.device.type == "cpu"
        and t.dtype == dtype
        and (torch.compiler.is_compiling() or not _functorch_wrapped(t))
    )


_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def plain_contiguous(t: Tensor, dtype: torch.dtype) -> bool:
    """`plain_cpu` and contiguous: a tensor a kernel reads from its data pointer row by row."""
    return plain_cpu(t, dtype) and t.is_contiguous()


def any_requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def optional_ptr(t: Tensor | None) -> int | None:
    """A tensor's data pointer for a C call, or None (NULL) for an absent one."""
    return None if t is None else t.data_ptr()
