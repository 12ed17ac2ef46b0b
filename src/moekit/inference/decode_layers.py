"""Whole decode layers in one C call: a decode position's attention block (q/k/v products, rope,
the cache write, attention, o_proj; here), a decoded token's MoE layer (`decode_moe`) and a whole
decoder block (`decode_block`), swapped in by `decode_glue.apply_decode_glue`; here also the
weights' descriptions the C calls read (`WeightRef`) and the kernels' row functions they run
(`ops_ready`).

Why (benchmarks/README.md, Decoding): on this project's 2-core machine a batch-1 decode token of
a small model spent ~7 ms outside its matrix products: every product a Python call, a ctypes call
and an OpenMP fork and join (~25 us each, 16 expert calls a token on decode.py's model), the
routing a dozen torch ops. Each layer is one ctypes call and one OpenMP parallel region here,
whose products run the one-product kernels' row functions (float32 or quantized), so results
equal the per-product path bit for bit and a layer that falls back (hooked, say) changes nothing.
The references, wherever a layer does not qualify: `Block.forward`, `MoELayer.forward` and
`Attention.forward` (tests/test_decode_layers.py).
"""

from __future__ import annotations

import ctypes
import functools
import threading
import weakref

import torch
from torch import Tensor, nn

from moekit.cbuild import optional_ptr
from moekit.inference import decode_kernels
from moekit.inference.decode_glue import (
    MAX_NORM_NUMBERS,
    GlueRMSNorm,
    _cache_qualifies,
    _intercepted,
    _library,
    _plain,
    attention_args,
    decode_position,
)
from moekit.inference.decode_kernels import MAX_ROWS
from moekit.model.attention import Attention, AttentionMask, LayerKVCache
from moekit.quant import kernels as quant_kernels
from moekit.quant.modules import QuantizedLinear
from moekit.quant.schemes import GROUP, QuantizedWeight


class WeightRef(ctypes.Structure):
    """decode_glue.c's weight_ref: one (O, I) matrix as stored, kind -1 for float32."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("kind", "O", "I", "ld")),
        *((name, ctypes.c_void_p) for name in ("data", "scales", "offsets", "bias")),
    ]


class AttentionRef(ctypes.Structure):
    """decode_glue.c's attention_ref: q, k, v, o_proj's weights; the q and k RMSNorm weights and
    their eps, per head (hd,) or over the whole projections (qk_full: (H hd,) and (KV hd,)), the
    sink logits (H,) (each None when the attention has none); the clamp bound of q, k and v where
    clipped."""

    _fields_ = [
        *((name, WeightRef) for name in ("q", "k", "v", "o")),
        *((name, ctypes.c_void_p) for name in ("q_norm", "k_norm")),
        ("qk_eps", ctypes.c_double),
        ("sinks", ctypes.c_void_p),
        ("qk_full", ctypes.c_int32),
        ("clipped", ctypes.c_int32),
        ("clip", ctypes.c_float),
    ]


class ActivationRef(ctypes.Structure):
    """decode_glue.c's activation_ref: GPT-OSS's clamped SwiGLU (quant/kernels.c's moekit_q_glu)."""

    _fields_ = [("clamped", ctypes.c_int), ("alpha", ctypes.c_float), ("limit", ctypes.c_float)]


def activation_ref(
    activation: str, alpha: float, limit: float, biased: bool = False
) -> ctypes._Pointer | bool | None:
    """How the C layers compute a gated FFN's `activation` (with its `alpha` and `limit`): None for
    SwiGLU (their own), a pointer to an `ActivationRef` for the clamped SwiGLU (where the
    quantized kernels, which run it, are built); False where they cannot (an ungated activation;
    a `biased` SwiGLU without the quantized kernels: `decode_moe.experts_activation`)."""
    if activation == "swiglu" and not (biased and not quant_kernels.available()):
        return None
    if activation == "clamped_swiglu" and quant_kernels.available():
        return ctypes.pointer(ActivationRef(1, alpha, limit))
    return False


def float_ref(w: Tensor, bias: Tensor | None = None) -> WeightRef | None:
    """A float32 weight (O, I) with rows of unit stride (and bias (O,)) as the C layers read it,
    or None if they cannot (other dtype or layout, the kernels not built). Callers check that no
    gradient is wanted before they run it."""
    if not (
        decode_kernels.plain_matrix(w)
        and (bias is None or (_plain(bias) and bias.shape == (w.shape[0],)))
        and decode_kernels.available()
    ):
        return None
    O, I = w.shape
    return WeightRef(-1, O, I, w.stride(0), w.data_ptr(), None, None, optional_ptr(bias))


def quant_ref(qw: QuantizedWeight, bias: Tensor | None = None) -> WeightRef | None:
    """A quantized weight (O, I) as the C layers read it (quant/kernels.c's layouts), or None."""
    shape = quant_kernels._kernel_shape(qw)
    if shape is None or not quant_kernels.available():
        return None
    O, I = shape
    if (qw.scheme in ("int4", "mxfp4") and I % GROUP) or (
        bias is not None and not (_plain(bias) and bias.shape == (O,))
    ):
        return None
    kind = quant_kernels._kind(qw.scheme, qw.offsets)
    scales, offsets, bias_ptr = (optional_ptr(t) for t in (qw.scales, qw.offsets, bias))
    return WeightRef(kind, O, I, I, qw.data.data_ptr(), scales, offsets, bias_ptr)


def projection_ref(module: nn.Module) -> WeightRef | None:
    """The weight of a decode-kernel projection (KernelLinear, QuantizedLinear), or None: any
    other module runs its own forward, which the C block would not reproduce."""
    if type(module) is decode_kernels.KernelLinear:
        return float_ref(module.weight, module.bias)
    if type(module) is QuantizedLinear:
        return quant_ref(module.weight_q, module.bias)
    return None


# What the C calls read of a module (its weights' refs, say), kept while the parameters and
# buffers of the modules it came from are the same tensors over the same memory (a key of ids and
# data pointers: a replaced parameter, `.data = ...` or `.to()` rebuilds it). Beside the modules,
# not in them: a deepcopy must not copy raw pointers into another model's memory.
_kept: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cached(owner: nn.Module, modules: tuple, build, extra: tuple = ()):
    """`build()`, kept for `owner` while `modules`' own parameters and buffers (not their
    children's) and `extra` stay as they were."""
    key = (
        *extra,
        *(
            (id(t), t.data_ptr())
            for m in modules
            for d in (m._parameters, m._buffers)
            for t in d.values()
            if t is not None
        ),
    )
    kept = _kept.get(owner)
    if kept is None or kept[0] != key:
        kept = (key, build())
        _kept[owner] = kept
    return kept[1]


@functools.cache
def ops_ready() -> bool:
    """Hand decode_glue.c the kernels' row functions once: True if the float32 kernels are built
    (the quantized ones where they are)."""
    glue, f32 = _library(), decode_kernels._library()
    if glue is None or f32 is None:
        return False
    q = quant_kernels._library()

    def address(lib, name):
        return None if lib is None else ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    glue.moekit_layers_set_ops(
        address(f32, "moekit_linear_rows_f32"),
        address(q, "moekit_q_prepare"),
        address(q, "moekit_q_rows"),
        address(q, "moekit_q_release"),
        address(q, "moekit_q_glu"),
    )
    return True


def decoded_rows(x: Tensor, D: int) -> int:
    """The rows of x (..., D) where the C layers take them: at most MAX_ROWS of plain float32, no
    gradient anywhere (generation's no_grad only: no cached view joins a graph), not traced, the
    kernels' rows handed to C (`ops_ready`); 0 otherwise."""
    if not (
        x.dim() > 0
        and x.shape[-1] == D
        and 0 < x.numel() <= MAX_ROWS * D
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _plain(x)
        and ops_ready()
    ):
        return 0
    return x.numel() // D


_scratch = threading.local()


def _buffers(n_floats: int, K: int) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """This thread's scratch (n_floats), ids (K) and weights (K): the C calls release the GIL, so
    threads decoding at once each need their own; one thread's calls run one after another."""
    kept = _scratch.__dict__.setdefault("buffers", {})
    if (n_floats, K) not in kept:
        kept[n_floats, K] = (
            (ctypes.c_float * n_floats)(),
            (ctypes.c_int64 * K)(),
            (ctypes.c_float * K)(),
        )
    return kept[n_floats, K]


# ---------------------------------------------------------------- the attention block


def attention_step_qualifies(
    attn: Attention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
) -> bool:
    """What a step must be for the C block, its weights aside: one position of at most MAX_ROWS
    plain float32 rows, no gradient for x, a float32 cache with room, every cached position of
    which it attends or a sliding window's, nothing hooked on the projections nor a forward of
    their own, not traced."""
    B = x_BSD.shape[0]
    return (
        decode_position(x_BSD, cache, mask)
        and not (torch.is_grad_enabled() and x_BSD.requires_grad)
        and _cache_qualifies(cache, B, attn.n_kv_heads, attn.head_dim, rope)
        and (attn.qk_norm is None or B * attn.n_heads * attn.head_dim <= MAX_NORM_NUMBERS)
        and not _intercepted(*attention_modules(attn))
        and ops_ready()
    )


def attention_modules(attn: Attention) -> tuple[nn.Module, ...]:
    """The modules whose work the C attention block does: the projections and the q/k norms."""
    own = attn._modules
    return tuple(own[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
                 if own.get(n) is not None)  # fmt: skip


def attention_weights(attn: Attention) -> AttentionRef | None:
    """The attention's weights as the C block reads them: decode-kernel projections of the heads'
    shapes, q/k norms (the glue's, per head or over the whole projection) or none, sinks or none,
    clipping or none; None otherwise. Kept while they stay."""
    modules = (attn, *attention_modules(attn))  # attn's own parameter: the sinks
    norms = (getattr(n, "eps", None) for n in (attn.q_norm, attn.k_norm))
    extra = (*map(id, modules), *norms, attn.qk_norm, attn.clip_qkv, attn.sinks is None)
    return _cached(attn, modules, lambda: _attention_refs(attn), extra)


def attention_forward(
    attn: Attention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None = None,
) -> Tensor:
    """`Attention.forward` for one decode position of at most MAX_ROWS sequences in one C call
    where the step (`attention_step_qualifies`) and the weights (`attention_weights`) qualify and
    no parameter wants a gradient; `Attention.forward` itself otherwise (with the glue's attention
    step)."""
    refs = None
    if attention_step_qualifies(attn, x_BSD, rope, mask, cache) and not (
        torch.is_grad_enabled() and any(p.requires_grad for p in attn.parameters())
    ):
        refs = attention_weights(attn)
    if refs is None or x_BSD.shape[-1] != refs.q.I:
        return Attention.forward(attn, x_BSD, rope, mask, cache)
    assert cache is not None
    B = x_BSD.shape[0]
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    scratch = x_BSD.new_empty(B * (2 * H + 2 * KV) * hd)
    out = x_BSD.new_empty(B, 1, refs.o.O)
    status = _library().moekit_attention_block(
        x_BSD.data_ptr(),
        B,
        ctypes.byref(refs),
        *attention_args(H, KV, hd, rope, cache, mask),
        scratch.data_ptr(),
        out.data_ptr(),
    )
    if status != 0:  # nothing was written to the cache: the reference runs the step
        return Attention.forward(attn, x_BSD, rope, mask, cache)
    cache.length += 1
    return out


def _attention_refs(attn: Attention) -> AttentionRef | None:
    clip = attn.clip_qkv
    if attn.qk_norm not in (None, "head", "full") or not (clip is None or clip > 0):
        return None  # (a bound <= 0 or NaN clamps as torch.clamp does not)
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    norms = (None, None)
    full = attn.qk_norm == "full"
    if attn.qk_norm is not None:
        norms = (
            norm_args(attn.q_norm, H * hd if full else hd),
            norm_args(attn.k_norm, KV * hd if full else hd),
        )
        if None in norms or norms[0][1] != norms[1][1]:  # (one eps for both in C)
            return None
    sinks = attn.sinks
    if sinks is not None and not (_plain(sinks) and sinks.shape == (H,)):
        return None
    projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    refs = tuple(projection_ref(p) for p in projs)
    if any(r is None for r in refs):
        return None
    q, k, v, o = refs
    if not (
        q.I == k.I == v.I == o.O and (H * hd, KV * hd, KV * hd, H * hd) == (q.O, k.O, v.O, o.I)
    ):
        return None
    q_norm, k_norm = (None if n is None else n[0] for n in norms)
    eps = 0.0 if norms[0] is None else norms[0][1]
    return AttentionRef(*refs, q_norm, k_norm, eps, optional_ptr(sinks), full, clip is not None,
                        0.0 if clip is None else clip)  # fmt: skip


def norm_args(norm: nn.Module | None, D: int) -> tuple[int, float] | None:
    """(weight pointer, eps) of the glue's RMSNorm (`GlueRMSNorm`) over the last D numbers, whose
    C function the C calls run, or None."""
    w = norm.weight if type(norm) is GlueRMSNorm else None
    if w is None or norm.normalized_shape != (D,) or not _plain(w):
        return None
    return w.data_ptr(), torch.finfo(torch.float32).eps if norm.eps is None else norm.eps
