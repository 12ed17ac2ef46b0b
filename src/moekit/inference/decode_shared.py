"""A MoE layer's shared experts (`SharedExperts`: one fused gated FFN, Qwen2-MoE's sigmoid gate
or none) for a few decoded rows in one C call (moekit_shared_tokens), swapped in for their
forward by `decode_glue.apply_decode_glue`; the MoE layer's and the whole block's C calls run the
same function inside them (`c_shared`), so a layer or block with shared experts decodes in one
call too, with the bits of the layer calls.

Why (benchmarks/README.md, Decoding): a layer with shared experts ran its forward module by
module (three products, the activation, the gate's sigmoid and product, the add: ~10 Python
calls), and its block and the model's step left the one-call path, for every Qwen2-MoE and
DeepSeek-style model. The reference, wherever this does not qualify (a hook on a module it would
bypass, gradients, more rows, a projection the kernels do not read): `SharedExperts.forward`,
which the C call matches to float32 rounding (it runs the C layers' SwiGLU and sigmoid, not
torch's); tests/test_decode_shared.py.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from moekit.experts.experts import SharedExperts, activate_fast
from moekit.inference.decode_glue import _hooked, _library, _plain
from moekit.inference.decode_layers import (
    MAX_ROWS,
    WeightRef,
    _buffers,
    _cached,
    activation_ref,
    decoded_rows,
    projection_ref,
)
from moekit.moe import MoELayer


class SharedRef(ctypes.Structure):
    """decode_glue.c's shared_ref: w_in (2 SW, D) and w_out (D, SW) with their biases; the gate
    (1, D), or an empty ref (O 0) where ungated."""

    _fields_ = [("w_in", WeightRef), ("w_out", WeightRef), ("gate", WeightRef)]


def shared_modules(shared: nn.Module) -> tuple[nn.Module, ...]:
    """The modules whose work the C call does without calling them: the shared experts, their
    projections and gate (read from the modules' own dicts: cheap); the module alone where it is
    not a `SharedExperts` (then no C call runs it)."""
    if type(shared) is not SharedExperts:
        return (shared,)
    own = shared._modules  # (a gate of None is an attribute, not in own)
    gate = own.get("gate")
    return (shared, own["w_in"], own["w_out"], *([] if gate is None else [gate]))


def shared_ref(shared: SharedExperts) -> SharedRef | None:
    """The shared experts as the C calls read them, or None where they cannot: projections the
    decode kernels run (`projection_ref`: KernelLinear, QuantizedLinear) of the fused gated
    FFN's shapes (their modules' own), a gate of one output, an activation the C layers compute,
    the forward the glue's or the class's. Kept while the modules and their tensors stay."""
    modules = shared_modules(shared)
    extra = (*map(id, modules), shared.activation, shared.__dict__.get("forward"))
    return _cached(shared, modules, lambda: _shared_ref(shared), extra)


def _shared_ref(shared: SharedExperts) -> SharedRef | None:
    forward = shared.__dict__.get("forward")
    if forward is not None and getattr(forward, "func", None) is not shared_forward:
        return None  # another forward put in its place: the C call would bypass it
    w_in, w_out = projection_ref(shared.w_in), projection_ref(shared.w_out)
    gate = None if shared.gate is None else projection_ref(shared.gate)
    if w_in is None or w_out is None or (shared.gate is not None and gate is None):
        return None
    D, SW = shared.w_in.in_features, shared.w_out.in_features  # (scratch is sized from these)
    if (
        (w_in.O, w_in.I, w_out.O, w_out.I) != (2 * SW, D, D, SW)  # an ungated w_in is (SW, D)
        or (shared.w_in.out_features, shared.w_out.out_features) != (2 * SW, D)
        or (gate is not None and (gate.O, gate.I) != (1, D))
        or activation_ref(*shared.activation) is False
    ):
        return None
    return SharedRef(w_in, w_out, WeightRef() if gate is None else gate)


def layer_shared_ref(layer: MoELayer) -> SharedRef | None:
    """`shared_ref` of a MoE layer's shared experts where its C call can add them: `SharedExperts`
    of the layer's width computing the routed experts' activation (the call runs both with one);
    None otherwise, or without shared experts."""
    shared, cfg = layer.shared_experts, layer.cfg
    if type(shared) is not SharedExperts:
        return None
    ref = shared_ref(shared)
    same = shared.activation == (cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    return ref if ref is not None and same and cfg.d_model == ref.w_out.O else None


def c_shared(layer: MoELayer) -> ctypes._CArgObject | None:
    """The shared experts' argument of a MoE layer's C call: byref of `layer_shared_ref`, or None
    where the layer has none, or they are hooked (a hook on any of `shared_modules`) or the C call
    cannot run them: then the layer calls them after, as its reference does."""
    shared = layer.shared_experts
    if shared is None or _hooked(*shared_modules(shared)):
        return None
    ref = layer_shared_ref(layer)
    return None if ref is None else ctypes.byref(ref)


def shared_floats(shared: nn.Module | None, rows: int) -> int:
    """The scratch floats the C shared experts of `rows` rows take within a layer's call
    (add_shared: 3 SW + 2 D + 1 a row; `_shared_ref` holds the C's shapes to the modules'); 0
    without shared experts the C calls run."""
    if type(shared) is not SharedExperts:
        return 0
    D, SW = shared.w_out.out_features, shared.w_out.in_features
    return rows * (3 * SW + 2 * D + 1)


def shared_forward(shared: SharedExperts, x_TD: Tensor) -> Tensor:
    """`SharedExperts.forward` for a few rows (at most MAX_ROWS) of plain float32 x with no
    gradient anywhere, in one C call where `shared_ref` reads the modules; where a projection or
    the gate is hooked, those called as modules (their hooks run) and the rest in C, the same
    bits (`_through_modules`); the class's forward otherwise."""
    T = decoded_rows(x_TD, shared.w_in.in_features)
    ref = shared_ref(shared) if T else None
    if ref is None:
        return SharedExperts.forward(shared, x_TD)
    act = activation_ref(*shared.activation)
    if _hooked(*shared_modules(shared)[1:]):  # (its own hooks ran: it was called)
        return _through_modules(shared, x_TD, act)
    y = x_TD.new_empty(x_TD.shape)
    scratch = _buffers(shared_floats(shared, MAX_ROWS), 1)[0]  # one set a thread and shape
    status = _library().moekit_shared_tokens(
        x_TD.data_ptr(), T, ctypes.byref(ref), act, scratch, y.data_ptr()
    )
    if status != 0:  # a product's x could not be prepared: the reference
        return SharedExperts.forward(shared, x_TD)
    return y


def _through_modules(shared: SharedExperts, x_TD: Tensor, act) -> Tensor:
    """moekit_shared_tokens' result with the projections and gate called as modules (the decode
    kernels' products, the C call's own, and their hooks), the activation and the gate's sigmoid
    by the C call's own arithmetic (moekit_shared_parts): the same bits as the one call. Where a
    hook replaced w_in's or the gate's output with something else, the rest as the class computes
    it from what they returned (each module called once)."""
    h = shared.w_in(x_TD)
    gate = None if shared.gate is None else shared.gate(x_TD)
    SW = shared.w_out.in_features
    T = h.numel() // max(h.shape[-1], 1)
    scales = None if gate is None else gate.to(torch.float32, copy=True).contiguous()
    if not (_plain(h) and h.shape[-1] == 2 * SW and (scales is None or scales.numel() == T)):
        y = shared.w_out(activate_fast(h, *shared.activation))
        return y if gate is None else y * torch.sigmoid(gate)
    a = h.new_empty(*h.shape[:-1], SW)
    _library().moekit_shared_parts(
        h.data_ptr(), T, SW, act, None if scales is None else scales.data_ptr(), a.data_ptr()
    )
    y = shared.w_out(a)
    return y if scales is None else y * scales.view(gate.shape)
