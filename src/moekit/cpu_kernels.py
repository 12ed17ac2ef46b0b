"""Few-row float32 kernels for CPU decoding: a linear (GEMV) and a whole SwiGLU expert, in C.

A batch-1 decode step is a chain of matrix-vector products: its speed is the rate at which the
weights stream from memory. On this project's machine (AMD EPYC, 2 cores) torch's F.linear (MKL)
streams a (2048, 768) float32 matrix at 11-12 GB/s, a third of what a plain `sum` reads (33 GB/s).
numpy's OpenBLAS streams 23-25 GB/s on its own, but its thread pool and torch's OpenMP pool then
take turns spinning on the same two cores, and a decode step got slower, not faster (measured).

`cpu_gemv.c` is a plain GEMV: each weight row is read once and multiplied by every input row, the
output rows split over torch's own OpenMP threads; `swiglu_expert` runs an expert's two
projections and its activation in one call. It is compiled on first use with the system C
compiler (`cc`, or $CC) into moekit's cache directory, keyed by the source's hash, and loaded with
ctypes. Where no compiler is found or the build fails, `linear` is `F.linear`, which stays the
reference (tests/test_cpu_kernels.py holds the kernel to it).

The model's projections are `Linear` (an nn.Linear whose forward is `linear`) and its routers,
tied LM head and experts call `linear` or `swiglu_expert`: each runs the kernel where `qualifies`
(CPU, float32, at most MAX_ROWS rows, no gradient: a decode step) and F.linear otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.fileio import atomic_path, default_cache_dir

SOURCE = Path(__file__).with_name("cpu_gemv.c")
MAX_ROWS = 16  # the decode path's batch sizes; larger products are GEMMs, MKL's domain
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11"]
LIBS = ["-lm"]  # after the source: with --as-needed linkers, a library before it is dropped


_enabled = True


@contextmanager
def reference_only() -> Iterator[None]:
    """Run F.linear (and torch's SwiGLU) instead of the kernels inside the block: to compare the
    two, or to rule the kernels out when chasing a numerical difference. Process-wide: it
    affects every thread while the block runs."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def qualifies(x: Tensor, w: Tensor, b: Tensor | None) -> bool:
    """Whether `linear` runs the kernel: plain CPU float32 tensors, x (..., I) with at most
    MAX_ROWS rows, W (O, I) with unit stride along I, b (O,) contiguous, no gradient needed by any
    of them, the kernel built and not inside `reference_only()`. Anything else is F.linear's."""
    return (
        _enabled
        and not (torch.is_grad_enabled() and _any_requires_grad(x, w, b))
        and _plain_cpu_float32(x)
        and _plain_cpu_float32(w)
        and w.dim() == 2
        and w.shape[0] > 0
        and w.shape[1] > 0
        and w.stride(1) == 1
        and x.dim() >= 1
        and x.shape[-1] == w.shape[1]
        and x.numel() <= MAX_ROWS * w.shape[1]
        and (
            b is None or (_plain_cpu_float32(b) and b.shape == (w.shape[0],) and b.is_contiguous())
        )
        and available()
    )


def expert_qualifies(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether `swiglu_expert` runs the kernel: as `qualifies`, x 2-D, both weights contiguous,
    w_in (2F, D) and w_out (D, F)."""
    return (
        x_ND.dim() == 2
        and qualifies(x_ND, w_in, None)
        and not (torch.is_grad_enabled() and _any_requires_grad(w_out))
        and _plain_cpu_float32(w_out)
        and w_out.dim() == 2
        and w_in.is_contiguous()
        and w_out.is_contiguous()
        and w_in.shape[0] == 2 * w_out.shape[1]
        and w_out.shape[0] == w_in.shape[1]
    )


def _any_requires_grad(*tensors: Tensor | None) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def _plain_cpu_float32(t: Tensor) -> bool:
    """A CPU float32 tensor whose data pointer is its data: not meta, not a functorch wrapper."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


def swiglu_expert(x_ND: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """One SwiGLU expert, x (N, D), w_in (2F, D) = [w_gate; w_up], w_out (D, F) -> (N, D):
    F.linear(silu(gate) * up, w_out) with [gate | up] = F.linear(x, w_in), in one kernel call where
    `expert_qualifies` (else exactly that, in torch)."""
    if not expert_qualifies(x_ND, w_in, w_out):
        gate, up = F.linear(x_ND, w_in).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_out)
    x_ND = x_ND.contiguous()
    N, D = x_ND.shape
    h_NH = x_ND.new_empty(N, w_in.shape[0])
    y_ND = x_ND.new_empty(N, D)
    _library().moekit_swiglu_expert_f32(
        x_ND.data_ptr(),
        N,
        D,
        w_in.data_ptr(),
        w_out.shape[1],
        w_out.data_ptr(),
        h_NH.data_ptr(),
        y_ND.data_ptr(),
    )
    return y_ND


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """F.linear(x (..., I), w (O, I), b (O,)) -> (..., O); the kernel where `qualifies`."""
    if not qualifies(x, w, b):
        return F.linear(x, w, b)
    x_RI = x.reshape(-1, w.shape[1]).contiguous()
    y_RO = x_RI.new_empty(x_RI.shape[0], w.shape[0])
    _library().moekit_linear_f32(
        x_RI.data_ptr(),
        x_RI.shape[0],
        x_RI.shape[1],
        w.data_ptr(),
        w.stride(0),
        w.shape[0],
        None if b is None else b.data_ptr(),
        y_RO.data_ptr(),
    )
    return y_RO.reshape(*x.shape[:-1], w.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and initialisation) whose forward is `linear`: the
    kernel for the few-row no-grad float32 products of decoding on CPU, F.linear otherwise."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def available() -> bool:
    """Whether the kernel is built and loaded (else `linear` is F.linear)."""
    return _library() is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MOEKIT_NO_KERNELS"):
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    try:
        lib = ctypes.CDLL(str(_build()))
        lib.moekit_linear_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr]
        lib.moekit_linear_f32.restype = None
        lib.moekit_swiglu_expert_f32.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, ptr]
        lib.moekit_swiglu_expert_f32.restype = None
    except (OSError, AttributeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        warnings.warn(
            f"moekit could not build its CPU decode kernels ({str(detail).strip()[-300:]}); "
            "decoding runs torch's F.linear instead. Install a C compiler with OpenMP (gcc) "
            "or set CC; MOEKIT_NO_KERNELS=1 silences this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return lib


def _build() -> Path:
    """The shared library for this source and compiler, compiled once into the cache directory
    (under a temporary name, then renamed, so concurrent first uses are safe)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler")
    command = [compiler, *FLAGS, "{source}", "-o", "{out}", *LIBS]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()
    path = default_cache_dir() / "kernels" / f"cpu_gemv-{key[:16]}.so"
    if not path.exists():
        with atomic_path(path) as out:
            names = {"{source}": str(SOURCE), "{out}": str(out)}
            filled = [names.get(arg, arg) for arg in command]
            subprocess.run(filled, check=True, capture_output=True, text=True)
    return path
