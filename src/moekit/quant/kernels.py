"""Products with quantized weights: `linear(x, qw, bias)` = F.linear(x, qw.dequantize(), bias), run
by a C kernel over the stored layout where it qualifies (a decode step's few rows), else by that
reference itself.

`kernels.c` (built and loaded through `moekit.cbuild`, as the float32 decode kernels are) reads
the layouts of `moekit.quant.schemes` as they are stored: bf16, int8 per channel, int4 in groups
of 32 with or without a zero point, MXFP4. Each weight row is read once, dequantized in registers
and multiplied by every row of x (float32, up to MAX_ROWS), accumulating in float32; the output
rows are split over torch's own OpenMP threads; sums run in an order that does not depend on the
thread count. An AVX2+FMA+F16C body is chosen at run time where the CPU has it, else a portable C
one; MOEKIT_PORTABLE=1 (or `use_path("portable")`) forces the portable one. AVX-512 (VNNI,
AVX512-BF16) is the next step, not written: this project's machine (AMD EPYC Zen 3) has none to
run it on. Registered as the torch op `moekit::quant_linear` (with a fake implementation for
torch.compile), called directly in eager decoding (`moekit.cbuild.call`).

Ours or a library's, per scheme (benchmarks/quant_kernels.py, figures in
benchmarks/results/quant_kernels.json; 2 threads, weights from DRAM, float32 x): ours, for all
four. torch has no bf16-weight product with float32 x (F.linear wants one dtype; with x in bf16
it was 1.1-1.5x slower at one row and 4-7x at eight). `torch._weight_int8pack_mm` with float32 x
was 6-10x slower; with bf16 x (x rounded to bf16) 1.4-1.9x slower at one row, 1.1-2.3x at eight.
`torch._weight_int4pack_mm_for_cpu` with float32 x was 12-20x slower; with bf16 x 1.2-1.7x slower
at one row and 1.0-1.2x at eight, and it needs the weight repacked to its own tiles and its
scales and zeros in x's dtype (6 bits a weight with float32 ones). torchao 0.18 (installed to
measure it; not a dependency) has no int4 kernel for this CPU (its CPU int4 layouts need mslk or
are gone), and its int8 and intx weight-only tensors dequantize the whole weight every call
(3-100x slower). torch has no MXFP4 product.

Where the time goes (gcc 12 -O3, instructions counted in its loops): bf16 and int8 at one row
stream their weights (a 2 KiB software prefetch ahead: without it int8 from DRAM was ~15%
slower); 4-bit is compute-bound on AVX2: 22 instructions a group of 32 weights at one row (0.69
a weight; int4: two zero-extending loads, mask and shift, four conversions, 4+1+1 FMAs: the
group's dot, its scale, its offset times x's sum, plus the broadcasts and loop), ~10 Gw/s a core
at 2.45 GHz (IPC ~2.8), about a third of the stream bound at 4.5 bits a weight; MXFP4's table
lookups (pshufb, then widening: 25 instructions a group, more of them on the shuffle ports) run
~30% slower than int4. At eight rows all schemes are FMA-bound (one FMA per
8 multiply-adds, 2 a cycle).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit import cbuild
from moekit.quant.schemes import GROUP, QuantizedWeight

SOURCE = Path(__file__).with_name("kernels.c")
MAX_ROWS = 16  # the decode path's batch sizes; larger products dequantize and run a GEMM
PATHS = ("portable", "avx2")  # kernels.c's PATH_PORTABLE, PATH_AVX2
_KIND = {"bf16": 0, "int8": 1, "int4": 2, "int4_zp": 3, "mxfp4": 4}  # kernels.c's enum
# Each stored tensor's dtype, as the kernel reads it.
_DTYPES = {
    "bf16": (torch.bfloat16, None),
    "int8": (torch.int8, torch.float32),
    "int4": (torch.uint8, torch.float16),
    "mxfp4": (torch.uint8, torch.uint8),
}

_ops = torch.library.Library("moekit", "FRAGMENT")  # decode_kernels holds the namespace's DEF
_ops.define(
    "quant_linear(Tensor x, str scheme, Tensor data, Tensor? scales, Tensor? offsets, "
    "Tensor? bias) -> Tensor"
)


def linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear(x (..., I), W (O, I), bias (O,)) -> (..., O) with W stored as `qw`: the kernel
    where `qualifies`, else F.linear over `qw.dequantize(x.dtype)` (the reference)."""
    if not qualifies(x, qw, bias):
        return F.linear(x, qw.dequantize(x.dtype), bias)
    op = torch.ops.moekit.quant_linear.default
    x_RI = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y_RO = cbuild.call(
        _linear_cpu, op, x_RI.contiguous(), qw.scheme, qw.data, qw.scales, qw.offsets, bias
    )
    return y_RO if x.dim() == 2 else y_RO.reshape(*x.shape[:-1], y_RO.shape[-1])


def qualifies(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> bool:
    """Whether `linear` runs the kernel: x (..., I) CPU float32 with at most MAX_ROWS rows, qw one
    (O, I) weight (no stacked leading dimensions) with contiguous tensors of the scheme's dtypes,
    bias (O,) contiguous float32 or None, no gradient needed, the kernels built."""
    data_dtype, scales_dtype = _DTYPES.get(qw.scheme, (None, None))
    data, scales, offsets = qw.data, qw.scales, qw.offsets
    if data.dim() != 2:
        return False  # stacked experts: index them first (qw[e])
    O, I = data.shape[0], data.shape[1] * (2 if qw.scheme in ("int4", "mxfp4") else 1)
    return (
        data_dtype is not None
        and O > 0
        and I > 0
        and not (
            torch.is_grad_enabled() and cbuild.any_requires_grad(x, bias, data, scales, offsets)
        )
        and cbuild.plain_cpu(x, torch.float32)
        and x.dim() >= 1
        and x.shape[-1] == I
        and 0 < x.numel() <= MAX_ROWS * I
        and cbuild.plain_cpu(data, data_dtype)
        and data.is_contiguous()
        and _scales_fit(qw, scales_dtype, O, I)
        and (offsets is None or (qw.scheme == "int4" and _fits(offsets, torch.float16, scales)))
        and (bias is None or (_fits(bias, torch.float32) and bias.shape == (O,)))
        and available()
    )


def _scales_fit(qw: QuantizedWeight, dtype: torch.dtype | None, O: int, I: int) -> bool:
    if dtype is None:
        return qw.scales is None
    shape = (O,) if qw.scheme == "int8" else (O, I // GROUP)
    return qw.scales is not None and _fits(qw.scales, dtype) and qw.scales.shape == shape


def _fits(t: Tensor, dtype: torch.dtype, like: Tensor | None = None) -> bool:
    return (
        cbuild.plain_cpu(t, dtype) and t.is_contiguous() and (like is None or t.shape == like.shape)
    )


def _linear_cpu(
    x_RI: Tensor,
    scheme: str,
    data: Tensor,
    scales: Tensor | None,
    offsets: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """x (R, I) contiguous float32, the weight's tensors as `qualifies` checks -> y (R, O)."""
    R, I = x_RI.shape
    O = data.shape[0]
    kind = _KIND["int4_zp" if offsets is not None else scheme]
    y_RO = x_RI.new_empty(R, O)  # on x's device, whatever the default
    status = _loaded().moekit_q_linear(
        kind,
        x_RI.data_ptr(),
        R,
        I,
        data.data_ptr(),
        None if scales is None else scales.data_ptr(),
        None if offsets is None else offsets.data_ptr(),
        O,
        None if bias is None else bias.data_ptr(),
        y_RO.data_ptr(),
    )
    if status != 0:
        raise ValueError(
            f"moekit::quant_linear cannot run {scheme} with x {tuple(x_RI.shape)} and a weight "
            f"of {O} rows: at most {MAX_ROWS} rows of x, 4-bit inputs a multiple of {GROUP}; "
            "call moekit.quant.kernels.linear, which checks and falls back to the reference"
        )
    return y_RO


_ops.impl("quant_linear", _linear_cpu, "CPU")


@torch.library.register_fake("moekit::quant_linear")
def _linear_fake(x_RI, scheme, data, scales, offsets, bias) -> Tensor:
    return x_RI.new_empty(x_RI.shape[0], data.shape[0])


def available() -> bool:
    """Whether the kernels are built and loaded (else `linear` is the reference)."""
    return _library() is not None


def path() -> str:
    """The body the kernels run: "avx2" or "portable"."""
    return PATHS[_loaded().moekit_q_set_path(_active_path())]


@contextlib.contextmanager
def use_path(name: str):
    """Run the kernels' `name` body ("portable", "avx2") inside the block (for tests and
    benchmarks); raises ValueError if this CPU cannot run it."""
    before = _active_path()
    _set_path(name)
    try:
        yield
    finally:
        _loaded().moekit_q_set_path(before)
        _PATH[0] = before


_PATH = [-1]  # the body chosen: -1 the best this CPU runs


def _active_path() -> int:
    return _PATH[0]


def _set_path(name: str) -> None:
    if name not in PATHS:
        raise ValueError(f"unknown kernel body {name!r}: use one of {PATHS}")
    if _loaded().moekit_q_set_path(PATHS.index(name)) < 0:
        raise ValueError(f"this CPU cannot run the {name} body (it lacks AVX2, FMA or F16C)")
    _PATH[0] = PATHS.index(name)


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(
            "moekit's quantized decode kernels are not built (see the warning above): call "
            "moekit.quant.kernels.linear, which falls back to the reference, not the op"
        )
    return library


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    library = cbuild.load(
        SOURCE,
        {
            "moekit_q_linear": ([i32, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr], i32),
            "moekit_q_set_path": ([i32], i32),
        },
        what="quantized decode kernels",
        fallback="products over quantized weights run F.linear on the dequantized weight",
    )
    if library is not None:  # dlopen hands back the one loaded library: choose its body afresh
        _PATH[0] = 0 if os.environ.get("MOEKIT_PORTABLE") else -1
        library.moekit_q_set_path(_PATH[0])
    return library
