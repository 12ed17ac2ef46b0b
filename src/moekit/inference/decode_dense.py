"""A dense block's FFN (`DenseFFN`: DeepSeek-V3's, Moonlight's and GLM's first layers) for a few
decoded rows in one C call (moekit_dense_tokens), swapped in for its forward by
`decode_glue.apply_decode_glue`; the block's and the whole step's C calls run the same function
inside them (`decode_block`), so a model with dense layers decodes a step in one call too, with
the bits of the layer calls.

The reference, wherever this does not qualify (more rows, gradients, a hook on a projection it
would bypass, a projection the kernels do not read): `DenseFFN.forward`, which the C call matches
to float32 rounding (its SwiGLU is the C layers', not torch's); tests/test_decode_dense.py.
"""

from __future__ import annotations

import ctypes

from torch import Tensor, nn

from moekit.inference.decode_glue import _intercepted, _library
from moekit.inference.decode_layers import (
    MAX_ROWS,
    WeightRef,
    _buffers,
    _cached,
    decoded_rows,
    projection_ref,
)
from moekit.model.block import DenseFFN


class DenseRef(ctypes.Structure):
    """decode_moe_layer.h's dense_ref: the gate and up (F, D) and down (D, F) projections."""

    _fields_ = [("gate", WeightRef), ("up", WeightRef), ("down", WeightRef)]


def dense_modules(ffn: DenseFFN) -> tuple[nn.Module, ...]:
    """The FFN and its three projections (from the module's own dict: cheap)."""
    own = ffn._modules
    return (ffn, own["w_gate"], own["w_up"], own["w_down"])


def dense_ref(ffn: DenseFFN) -> DenseRef | None:
    """The FFN as the C calls read it: decode-kernel projections (`projection_ref`) of its
    modules' shapes, no biases, the forward the glue's or the class's; None otherwise. Kept while
    the modules and their tensors stay."""
    modules = dense_modules(ffn)
    extra = (*map(id, modules), ffn.__dict__.get("forward"))
    return _cached(ffn, modules, lambda: _dense_ref(ffn), extra)


def _dense_ref(ffn: DenseFFN) -> DenseRef | None:
    forward = ffn.__dict__.get("forward")
    if forward is not None and getattr(forward, "func", None) is not dense_forward:
        return None  # another forward put in its place: the C call would bypass it
    refs = [projection_ref(m) for m in dense_modules(ffn)[1:]]
    if None in refs or any(r.bias for r in refs):  # (projections the kernels run: their shapes)
        return None
    gate, up, down = refs
    D, F = ffn.w_gate.in_features, ffn.w_gate.out_features  # (scratch is sized from these)
    if {(gate.O, gate.I), (up.O, up.I)} != {(F, D)} or (down.O, down.I) != (D, F):
        return None
    return DenseRef(gate, up, down)


def dense_floats(ffn: DenseFFN, rows: int) -> int:
    """The scratch floats moekit_dense_tokens takes for `rows` rows: 3 F a row."""
    return 3 * rows * ffn.w_gate.out_features


def dense_forward(ffn: DenseFFN, x: Tensor) -> Tensor:
    """`DenseFFN.forward` for a few rows (at most MAX_ROWS) of plain float32 x with no gradient
    anywhere, in one C call where `dense_ref` reads the modules and none of the projections is
    hooked or has a forward of its own; the class's forward otherwise."""
    projections = dense_modules(ffn)[1:]
    T = decoded_rows(x, x.shape[-1]) if x.dim() else 0
    ref = None
    if T and not _intercepted(*projections):
        ref = dense_ref(ffn)
    if ref is None or x.shape[-1] != ref.gate.I:
        return DenseFFN.forward(ffn, x)
    y = x.new_empty(x.shape)
    scratch = _buffers(dense_floats(ffn, MAX_ROWS), 1)[0]  # one set a thread and shape
    if _library().moekit_dense_tokens(x.data_ptr(), T, ctypes.byref(ref), scratch, y.data_ptr()):
        return DenseFFN.forward(ffn, x)  # a product's x could not be prepared
    return y
