"""Products with quantized weights: `linear(x, qw, bias)` = F.linear(x, qw.dequantize(), bias), and
`swiglu_expert(x, w_in, w_out)`, a whole SwiGLU expert in one call (10-18% faster than two `linear`
calls and torch's silu at one row), run by C kernels (`kernels.c`: torch ops with fakes) where
they qualify (a decode step's or a prompt's rows), else by that reference. Each weight row is read
once a pass, dequantized in registers and multiplied by every row of x (float32, MAX_ROWS a
pass), accumulating in float32 in an order torch's OpenMP threads do not change. The widest body
the CPU runs is chosen: AVX-512 (AVX512F/BW/VNNI: 16-lane steps for int8 weights and for int8 x,
vpdpbusd in place of maddubs + madd, its sums bit for bit the AVX2 body's), AVX2+FMA+F16C, else
a portable one (MOEKIT_PORTABLE=1 or `use_path("portable")`).

Two paths for int8, int4 and MXFP4 weights (`set_activations`, `use_activations`, or
MOEKIT_QUANT_ACTIVATIONS=float|int8 for every scheme; bf16 always takes float x): "float", the
weights dequantized to float32 in registers, times float32 x; "int8" (llama.cpp's q8_0 idea),
each row of x quantized to int8 per block of 32 (scale max|x| / 127, round half to even), integer
dot products per block, scaled and summed in float32 in a fixed order: within (d / 2) @ |W|^T of
the float path, d each block's x scale. int8 x is the default for int4 and MXFP4, which the float
path leaves compute-bound (`DEFAULT_ACTIVATIONS`). Faster than torch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu`; figures, error study: benchmarks/README.md, Quantized weights.
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
from moekit.cbuild import optional_ptr
from moekit.experts.experts import activate
from moekit.quant.schemes import GROUP, QuantizedWeight

SOURCE = Path(__file__).with_name("kernels.c")
MAX_ROWS = 16  # rows of x a kernel pass takes (the decode path's batch sizes)
# Rows up to which passes of MAX_ROWS beat dequantizing for a GEMM on a SIMD body (4-bit on int8 x,
# and on float x): benchmarks/kernel_rows.py's `recommended` (results/kernel_rows_intel*.json;
# MXFP4's 256 is the largest count it tries, where passes still win)
KERNEL_ROWS = {"bf16": 16, "int8": 32, "int4": 96, "mxfp4": 256}
KERNEL_ROWS_FLOAT_X = {"int4": 32, "mxfp4": 64}
PATHS = ("portable", "avx2", "avx512")  # kernels.c's PATH_PORTABLE, PATH_AVX2, PATH_AVX512
ACTIVATIONS = ("float", "int8")  # how x enters the product: float32, or int8 per block of 32
# The path each scheme takes unless MOEKIT_QUANT_ACTIVATIONS=float|int8 (or set_activations).
DEFAULT_ACTIVATIONS = {"bf16": "float", "int8": "float", "int4": "int8", "mxfp4": "int8"}
_KIND = {"bf16": 0, "int8": 1, "int4": 2, "int4_zp": 3, "mxfp4": 4}  # kernels.c's enum
_DTYPES = {"bf16": (torch.bfloat16, None), "int8": (torch.int8, torch.float32),  # data, scales
           "int4": (torch.uint8, torch.float16), "mxfp4": (torch.uint8, torch.uint8)}  # fmt: skip

_ops = torch.library.Library("moekit", "FRAGMENT")  # decode_kernels holds the namespace's DEF
_ops.define(
    "quant_linear(Tensor x, str scheme, Tensor data, Tensor? scales, Tensor? offsets, "
    "Tensor? bias) -> Tensor"
)
_ops.define(
    "quant_swiglu_expert(Tensor x, str scheme_in, Tensor data_in, Tensor? scales_in, "
    "Tensor? offsets_in, str scheme_out, Tensor data_out, Tensor? scales_out, "
    "Tensor? offsets_out) -> Tensor"
)


def linear(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear(x (..., I), W (O, I), bias (O,)) -> (..., O) with W stored as `qw`: the kernel
    where `qualifies`, else F.linear over `qw.dequantize(x.dtype)` (the reference). A bfloat16 or
    float16 x (a checkpoint loaded as it ships: GPT-OSS's kept MXFP4 experts beside bfloat16
    weights) runs the kernel in float32 and is cast back."""
    if x.dtype in (torch.bfloat16, torch.float16) and x.is_cpu:
        x32, bias32 = x.float(), None if bias is None else bias.float()
        if qualifies(x32, qw, bias32):
            return linear(x32, qw, bias32).to(x.dtype)
    if not qualifies(x, qw, bias):
        return F.linear(x, qw.dequantize(x.dtype), bias)
    op = torch.ops.moekit.quant_linear.default
    x_RI = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y_RO = cbuild.call(
        _linear_cpu, op, x_RI.contiguous(), qw.scheme, qw.data, qw.scales, qw.offsets, bias
    )
    return y_RO if x.dim() == 2 else y_RO.reshape(*x.shape[:-1], y_RO.shape[-1])


def kernel_rows(scheme: str) -> int:
    """Rows of x up to which `linear` runs the kernel on a weight of `scheme`: KERNEL_ROWS
    (KERNEL_ROWS_FLOAT_X for 4-bit weights on float x), MAX_ROWS (one pass) on the portable body."""
    if _BODY[0] == "portable":
        return MAX_ROWS
    float_x = scheme in KERNEL_ROWS_FLOAT_X and _ACTIVATIONS[scheme] == "float"
    return KERNEL_ROWS_FLOAT_X[scheme] if float_x else KERNEL_ROWS[scheme]


def qualifies(x: Tensor, qw: QuantizedWeight, bias: Tensor | None = None) -> bool:
    """Whether `linear` runs the kernel: x (..., I) CPU float32 of up to `kernel_rows` rows, qw one
    (O, I) weight (no stacked leading dimensions) with contiguous tensors of the scheme's dtypes,
    bias (O,) contiguous float32 or None, no gradient needed, the kernels built."""
    shape = _kernel_shape(qw)
    return (
        shape is not None
        and not (torch.is_grad_enabled() and cbuild.any_requires_grad(x, bias, qw.data))
        and cbuild.plain_cpu(x, torch.float32)
        and x.dim() >= 1
        and x.shape[-1] == shape[1]
        and (bias is None or _fits(bias, torch.float32, (shape[0],)))
        and available()  # (loads the library, which sets the body kernel_rows reads)
        and 0 < x.numel() <= kernel_rows(qw.scheme) * shape[1]
    )


def _kernel_shape(qw: QuantizedWeight) -> tuple[int, int] | None:
    """(O, I) of a weight the kernels read: one matrix, its tensors contiguous CPU tensors of the
    scheme's dtypes and shapes, none needing a gradient; else None."""
    data_dtype, scales_dtype = _DTYPES.get(qw.scheme, (None, None))
    scales, offsets = qw.scales, qw.offsets
    if data_dtype is None or qw.data.dim() != 2:
        return None  # stacked experts: index them first (qw[e])
    O, I = qw.shape
    groups = (O,) if qw.scheme == "int8" else (O, I // GROUP)  # the scales' (and offsets') shape
    fits = (
        O > 0
        and I > 0
        and _fits(qw.data, data_dtype)
        and not (torch.is_grad_enabled() and cbuild.any_requires_grad(qw.data, scales, offsets))
        and (scales is None if scales_dtype is None else _fits(scales, scales_dtype, groups))
        and (offsets is None or (qw.scheme == "int4" and _fits(offsets, torch.float16, groups)))
    )
    return (O, I) if fits else None


def swiglu_expert(x_ND: Tensor, w_in: QuantizedWeight, w_out: QuantizedWeight) -> Tensor:
    """One SwiGLU expert, x (N, D), w_in (2F, D) = [w_gate; w_up], w_out (D, F) stored quantized
    (each in any scheme) -> (N, D): linear(silu(gate) * up, w_out) with [gate | up] =
    linear(x, w_in), in one kernel call where `expert_qualifies` (else exactly that)."""
    if not expert_qualifies(x_ND, w_in, w_out):
        gate, up = linear(x_ND, w_in).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, w_out)
    op = torch.ops.moekit.quant_swiglu_expert.default
    args = (w_in.scheme, w_in.data, w_in.scales, w_in.offsets)
    args += (w_out.scheme, w_out.data, w_out.scales, w_out.offsets)
    return cbuild.call(_swiglu_expert_cpu, op, x_ND.contiguous(), *args)


def glu(h_NH: Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """`moekit.experts.activate` (same arguments), the gated activations ("swiglu",
    "clamped_swiglu") of plain float32 rows without gradients in one C call (moekit_q_glu_rows:
    the function the C MoE layers of moekit.inference run, so a layer and its per-expert
    reference agree bit for bit); `activate` itself otherwise."""
    if (
        activation not in ("swiglu", "clamped_swiglu")
        or h_NH.dim() != 2
        or h_NH.shape[1] % 2
        or not cbuild.plain_contiguous(h_NH, torch.float32)
        or torch.compiler.is_compiling()
        or (torch.is_grad_enabled() and h_NH.requires_grad)
        or _library() is None
    ):
        return activate(h_NH, activation, alpha, limit)
    N, F2 = h_NH.shape
    act_NF = h_NH.new_empty(N, F2 // 2)
    _loaded().moekit_q_glu_rows(
        h_NH.data_ptr(), N, F2 // 2, activation == "clamped_swiglu", alpha, limit, act_NF.data_ptr()
    )
    return act_NF


def expert_qualifies(x_ND: Tensor, w_in: QuantizedWeight, w_out: QuantizedWeight) -> bool:
    """Whether `swiglu_expert` runs the kernel: `qualifies` for x and w_in (2F, D), w_out (D, F)."""
    shape_out = _kernel_shape(w_out)
    return (
        x_ND.dim() == 2
        and qualifies(x_ND, w_in)
        and shape_out is not None
        and x_ND.shape[0] <= kernel_rows(w_out.scheme)
        and w_in.data.shape[0] == 2 * shape_out[1]
        and shape_out[0] == x_ND.shape[1]
    )


def _fits(t: Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> bool:
    return cbuild.plain_contiguous(t, dtype) and (shape is None or t.shape == shape)


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
    y_RO = x_RI.new_empty(R, O)  # on x's device, whatever the default
    status = _loaded().moekit_q_linear(
        _kind(scheme, offsets), x_RI.data_ptr(), R, I, data.data_ptr(), optional_ptr(scales),
        optional_ptr(offsets), O, optional_ptr(bias), y_RO.data_ptr()
    )  # fmt: skip
    if status != 0:
        raise ValueError(
            f"moekit::quant_linear cannot run {scheme} with x {tuple(x_RI.shape)} and a weight "
            f"of {O} rows (rows >= 1, 4-bit inputs a multiple of {GROUP}, memory for x): call "
            "moekit.quant.kernels.linear, which checks and falls back to the reference"
        )
    return y_RO


def _swiglu_expert_cpu(
    x_ND: Tensor,
    scheme_in: str,
    data_in: Tensor,
    scales_in: Tensor | None,
    offsets_in: Tensor | None,
    scheme_out: str,
    data_out: Tensor,
    scales_out: Tensor | None,
    offsets_out: Tensor | None,
) -> Tensor:
    """x (N, D) contiguous float32, the weights as `expert_qualifies` checks -> y (N, D)."""
    N, D = x_ND.shape
    h_NH = x_ND.new_empty(N, data_in.shape[0])  # scratch: [gate | up], then the activation
    y_ND = x_ND.new_empty(N, D)
    F_ = data_in.shape[0] // 2
    status = _loaded().moekit_q_swiglu_expert(
        _kind(scheme_in, offsets_in), x_ND.data_ptr(), N, D, data_in.data_ptr(),
        optional_ptr(scales_in), optional_ptr(offsets_in), F_, _kind(scheme_out, offsets_out),
        data_out.data_ptr(), optional_ptr(scales_out), optional_ptr(offsets_out),
        h_NH.data_ptr(), y_ND.data_ptr()
    )  # fmt: skip
    if status != 0:
        raise ValueError(
            f"moekit::quant_swiglu_expert cannot run x {tuple(x_ND.shape)} (rows >= 1, 4-bit "
            f"inputs a multiple of {GROUP}, memory for x): call "
            "moekit.quant.kernels.swiglu_expert, which checks and falls back to the reference"
        )
    return y_ND


def _kind(scheme: str, offsets: Tensor | None) -> int:
    return _KIND["int4_zp" if offsets is not None else scheme]


_ops.impl("quant_linear", _linear_cpu, "CPU")
_ops.impl("quant_swiglu_expert", _swiglu_expert_cpu, "CPU")


@torch.library.register_fake("moekit::quant_swiglu_expert")
def _swiglu_expert_fake(x_ND, *weights) -> Tensor:
    return x_ND.new_empty(x_ND.shape)


@torch.library.register_fake("moekit::quant_linear")
def _linear_fake(x_RI, scheme, data, scales, offsets, bias) -> Tensor:
    return x_RI.new_empty(x_RI.shape[0], data.shape[0])


def available() -> bool:
    """Whether the kernels are built and loaded (else `linear` is the reference)."""
    return _library() is not None


def path() -> str:
    """The body the kernels run: "avx512", "avx2" or "portable"."""
    _loaded()  # (its loading chooses the body)
    return _BODY[0]


@contextlib.contextmanager
def use_path(name: str):
    """Run the kernels' `name` body ("portable", "avx2", "avx512") inside the block (for tests and
    benchmarks); raises ValueError if this CPU cannot run it."""
    if name not in PATHS:
        raise ValueError(f"unknown kernel body {name!r}: use one of {PATHS}")
    library = _loaded()
    before = _PATH[0]  # (read after the load, which on a first load chooses the body)
    if library.moekit_q_set_path(PATHS.index(name)) < 0:
        needs = "AVX2, FMA, F16C" + (", AVX512F, AVX512BW, AVX512-VNNI" if name == "avx512" else "")
        raise ValueError(f"this CPU cannot run the {name} body (it needs {needs})")
    _PATH[0], _BODY[0] = PATHS.index(name), name
    try:
        yield
    finally:
        _BODY[0] = PATHS[_loaded().moekit_q_set_path(before)]
        _PATH[0] = before


def cannot_run(name: str) -> str | None:
    """Why the kernels' `name` body cannot run here (unknown, this CPU, not built), else None."""
    try:
        with use_path(name):
            return None
    except (ValueError, RuntimeError) as err:
        return str(err)


_PATH = [-1]  # the body chosen: -1 the best this CPU runs
_BODY = ["portable"]  # the body it runs (set with the library's; kernel_rows reads it per call)


def _default_activations() -> dict[str, str]:
    forced = os.environ.get("MOEKIT_QUANT_ACTIVATIONS")
    if forced is None:
        return dict(DEFAULT_ACTIVATIONS)
    if forced not in ACTIVATIONS:
        raise ValueError(f"MOEKIT_QUANT_ACTIVATIONS={forced!r}: use one of {ACTIVATIONS}")
    return _every(forced)


def _every(mode: str) -> dict[str, str]:
    """`mode` for every quantized scheme; bf16 takes float x."""
    return {scheme: "float" if scheme == "bf16" else mode for scheme in DEFAULT_ACTIVATIONS}


_ACTIVATIONS = _default_activations()  # scheme -> "float" or "int8": x as the kernels take it


def _x8_mask(choice: dict[str, str]) -> int:
    """kernels.c's bit mask of the kinds that take int8 x (int4_zp as int4 chooses)."""
    return sum(1 << k for kind, k in _KIND.items() if choice[kind.removesuffix("_zp")] == "int8")


def activations() -> dict[str, str]:
    """Per scheme, how the kernels take x: "int8" (quantized per block of 32, integer dots) or
    "float" (the weights dequantized to float32 in registers)."""
    return dict(_ACTIVATIONS)


def set_activations(mode: str | dict[str, str]) -> None:
    """Choose the kernels' path: "float" or "int8" for every quantized scheme (bf16 always takes
    float x), or {scheme: mode} for some; "default" restores `DEFAULT_ACTIVATIONS`."""
    if mode == "default":
        choice = dict(DEFAULT_ACTIVATIONS)
    elif isinstance(mode, str):
        choice = _every(mode)
    else:
        choice = {**_ACTIVATIONS, **mode}
    bad = {s: m for s, m in choice.items() if s not in _DTYPES or m not in ACTIVATIONS}
    if bad or choice["bf16"] != "float":
        raise ValueError(
            f"activations {mode!r}: schemes {tuple(_DTYPES)}, modes {ACTIVATIONS} "
            "(bf16 takes float x only)"
        )
    _ACTIVATIONS.clear()
    _ACTIVATIONS.update(choice)
    if available():
        _loaded().moekit_q_set_x8(_x8_mask(choice))


@contextlib.contextmanager
def use_activations(mode: str | dict[str, str]):
    """`set_activations(mode)` inside the block, the choice before it restored after."""
    before = dict(_ACTIVATIONS)
    set_activations(mode)
    try:
        yield
    finally:
        set_activations(before)


def _loaded() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError(
            "moekit's quantized decode kernels are not built (see the warning above): call "
            "moekit.quant.kernels.linear, which falls back to the reference, not the op"
        )
    return library


_ptr, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # kernels.c's entry points this module calls: {name: (argtypes, restype)}
    "moekit_q_linear": ([_i32, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr], _i32),
    "moekit_q_set_path": ([_i32], _i32),
    "moekit_q_set_x8": ([_i32], _i32),
    "moekit_q_glu_rows": ([_ptr, _i64, _i64, _i32, ctypes.c_float, ctypes.c_float, _ptr], None),
    "moekit_q_swiglu_expert": (
        [_i32, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr],
        _i32,
    ),
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cbuild.load(
        SOURCE,
        SIGNATURES,
        what="quantized decode kernels",
        fallback="products over quantized weights run F.linear on the dequantized weight",
        flags=cbuild.FLAGS_O2,
    )
    if library is not None:  # dlopen hands back the one loaded library: choose its body afresh
        _PATH[0] = 0 if os.environ.get("MOEKIT_PORTABLE") else -1
        _BODY[0] = PATHS[library.moekit_q_set_path(_PATH[0])]
        _ACTIVATIONS.clear()  # MOEKIT_QUANT_ACTIVATIONS read afresh too
        _ACTIVATIONS.update(_default_activations())
        library.moekit_q_set_x8(_x8_mask(_ACTIVATIONS))
    return library
