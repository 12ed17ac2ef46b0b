"""CPU decode glue: the per-token ops between a decode step's products, in C (`decode_glue.c`),
swapped in for generation by `apply_decode_glue(model)` (`apply_decode_kernels` calls it).

A batch-1 decode step of a small model on this project's machine (AMD EPYC, 2 cores) is mostly
framework overhead: ~4 us an op, torch's rms_norm a composite of ~6 of them (~16 us for 64
numbers), a step's attention ~25 (rope of q and k, the cache's slice writes, SDPA with its OpenMP
fork, views). Here each is one ctypes call: `rms_norm` (`GlueRMSNorm`), `glue_cached_attention`
(one new position's rope, cache write and attention over every cached position or a sliding
window's, sinks or not); and whole layers (`decode_layers`, `decode_moe`, `decode_block`) and
generation's whole step of up to 16 sequences (`decode_step`) run on this module's library.

Anything else (training, gradients, other dtypes, prefill, other masks, `torch.compile` tracing)
runs the torch reference, nn.RMSNorm and `moekit.model.attention.cached_attention`, which the
outputs match to float32 rounding (tests/test_decode_fast_paths.py); so does all of it where
MOEKIT_NO_KERNELS=1 is set or no C compiler is found.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from moekit import cbuild
from moekit.experts.experts import SharedExperts
from moekit.inference.decode_kernels import MAX_ROWS, _plain
from moekit.model.attention import Attention, AttentionMask, LayerKVCache, cached_attention
from moekit.model.block import Block, DenseFFN
from moekit.model.mla import LatentAttention
from moekit.model.transformer import MoETransformer
from moekit.moe import MoELayer
from moekit.routing.router import Router

SOURCE = Path(__file__).with_name("decode_glue.c")
# rms_norm's C at most: MAX_ROWS rows of a model of width 8192, or the q/k norms of MAX_ROWS
# sequences of 64 heads of 128 (the C attention block's and the C step's, decode_step, which
# must equal these bits: above it they run the reference)
MAX_NORM_NUMBERS = MAX_ROWS * 8192


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook, global or of one of `modules`, waits for a call that
    a glued forward would not make (it runs their products itself): it then runs the reference,
    which calls them (a `TraceRecorder`'s hooks on the routers and experts, say)."""
    return any(hook_dicts(*modules))


def _replaced(*modules: nn.Module) -> bool:
    """Whether a forward of its own was put in any of `modules`' place (an instance attribute):
    a glued forward that runs their work itself would bypass it, so the reference runs, which
    calls them."""
    return any("forward" in m.__dict__ for m in modules)


def _intercepted(*modules: nn.Module) -> bool:
    """`_hooked` or `_replaced`: a call the glue would not make is awaited by one of `modules`."""
    return _hooked(*modules) or _replaced(*modules)


def decode_position(x_BSD: Tensor, cache: LayerKVCache | None, mask: AttentionMask) -> bool:
    """What every C attention step needs of its input, before its own checks: one position of
    at most MAX_ROWS plain float32 rows over a cache, attending every cached position or a
    sliding window's, not traced."""
    B, S, _ = x_BSD.shape
    return (
        S == 1
        and B <= MAX_ROWS
        and cache is not None
        and decode_window(mask) is not None
        and not torch.compiler.is_compiling()
        and _plain(x_BSD)
    )


def hook_dicts(*modules: nn.Module) -> tuple[dict, ...]:
    """The dicts that hold those hooks (registering one adds to them in place): `_hooked` is
    any(hook_dicts(...)), which a caller checking the same modules again and again keeps."""
    return (
        torch_module._global_forward_hooks,
        torch_module._global_forward_pre_hooks,
        *(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)),
    )


def _eager_no_grad(*tensors: Tensor) -> bool:
    return not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and cbuild.any_requires_grad(*tensors)
    )


def rms_norm(x: Tensor, weight: Tensor | None, eps: float | None) -> Tensor:
    """torch.rms_norm(x (..., D), (D,), weight (D,), eps), in one C call for a few float32 rows."""
    D = x.shape[-1]
    if (
        weight is None
        or not _eager_no_grad(x, weight)
        or not (cbuild.plain_cpu(x, torch.float32) and _plain(weight) and weight.shape == (D,))
        or x.numel() > MAX_NORM_NUMBERS
        or x.numel() == 0
        or _library() is None
    ):
        return torch.rms_norm(x, (D,), weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    x = x.contiguous()  # (a split's rows, as latent attention's latent of a few positions)
    y = torch.empty_like(x)
    _library().moekit_rmsnorm_f32(
        x.data_ptr(), x.numel() // D, D, weight.data_ptr(), eps, y.data_ptr()
    )
    return y


class GlueRMSNorm(nn.RMSNorm):
    """nn.RMSNorm (same parameter, state dict) whose forward is `rms_norm`."""

    @classmethod
    def sharing(cls, module: nn.RMSNorm) -> GlueRMSNorm:
        """A GlueRMSNorm holding `module`'s own weight (nothing is copied)."""
        new = cls(module.normalized_shape, module.eps, module.elementwise_affine, device="meta")
        new.weight = module.weight
        return new.train(module.training)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return rms_norm(x, self.weight, self.eps)


def glue_cached_attention(
    q_BHSd: Tensor,
    k_BKSd: Tensor,
    v_BKSd: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
    sinks_H: Tensor | None = None,
) -> Tensor:
    """`cached_attention` in one C call for one new position over a float32 cache whose every
    position it may attend, or its last positions of a sliding window (`decode_window`), with or
    without sinks; the reference otherwise."""
    if not _attention_qualifies(q_BHSd, k_BKSd, v_BKSd, rope, mask, cache, sinks_H):
        return cached_attention(q_BHSd, k_BKSd, v_BKSd, rope, mask, cache, sinks_H)
    assert cache is not None
    B, H, _, hd = q_BHSd.shape
    KV = cache.k_BKLd.shape[1]
    y_BHSd = torch.empty_like(q_BHSd)
    _library().moekit_attend_one_f32(  # sequence b's q at q + 4 * b * H * hd (k, v: KV * hd)
        q_BHSd.data_ptr(),
        k_BKSd.data_ptr(),
        v_BKSd.data_ptr(),
        H * hd,
        KV * hd,
        B,
        *attention_args(H, KV, hd, rope, cache, mask),
        cbuild.optional_ptr(sinks_H),
        y_BHSd.data_ptr(),
    )
    cache.length += 1
    return y_BHSd


def attention_args(
    H: int, KV: int, hd: int, rope: tuple[Tensor, Tensor], cache: LayerKVCache, mask: AttentionMask
) -> tuple:
    """The C attention's arguments from cos to window, for H query heads and KV key/value heads of
    hd: the position's angles, the cache (its tensors, filled length, room), the heads and the
    keys attended (`decode_window`)."""
    k, v = cache.k_BKLd, cache.v_BKLd
    cos, sin = rope
    return (cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(), cache.length,
            k.shape[2], H, KV, hd, hd**-0.5, decode_window(mask))  # fmt: skip


def _attention_qualifies(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
    sinks: Tensor | None,
) -> bool:
    if cache is None or decode_window(mask) is None or q.shape[2] != 1:
        return False
    B, H, _, hd = q.shape
    KV = k.shape[1]
    return (
        (sinks is None or (_plain(sinks) and sinks.shape == (H,) and _eager_no_grad(sinks)))
        and _eager_no_grad(q, k, v)
        and all(_plain(t) for t in (q, k, v))
        and k.shape == v.shape == (B, KV, 1, hd)
        and H % KV == 0
        and _cache_qualifies(cache, B, KV, hd, rope)
    )


def decode_window(mask: AttentionMask) -> int | None:
    """Which cached keys one decode query attends, as the C attention reads it: 0 for all of them
    (no explicit mask), the window for a sliding window's mask (its last `window` keys); None for
    any other mask (the reference runs)."""
    if mask.mask_SL is None:
        return 0
    return mask.window if mask.window is not None and mask.window > 0 else None


def _cache_qualifies(
    cache: LayerKVCache, B: int, KV: int, hd: int, rope: tuple[Tensor, Tensor]
) -> bool:
    ck, cv = cache.k_BKLd, cache.v_BKLd
    cos, sin = rope
    return (
        all(_plain(t) for t in (cos, sin, ck, cv))
        and ck.shape == cv.shape
        and ck.shape[:2] == (B, KV)
        and ck.shape[3] == hd
        and hd % 2 == 0
        and cos.shape == sin.shape == (1, hd // 2)
        and cache.length < ck.shape[2]  # room left (the reference raises the overflow)
        and _library() is not None
    )


def apply_decode_glue(model: MoETransformer) -> MoETransformer:
    """Swap the glue into `model` for generation, in place: every nn.RMSNorm becomes a
    `GlueRMSNorm` sharing its weight; every `Attention` runs `glue_cached_attention` and
    `decode_layers.attention_forward`, every `LatentAttention` `decode_mla.
    latent_attention_forward` (its decode steps in the latent space), every MoE layer and its router
    `decode_moe.moe_forward` and `router_forward`, its shared experts
    `decode_shared.shared_forward`, every dense FFN `decode_dense.dense_forward`, every decoder
    block `decode_block.block_forward`.
    Nothing is copied: the model saves and deep-copies as before. Returns `model`;
    `remove_decode_glue` undoes it."""
    # here, not at the top: they build on this module's checks and library
    from moekit.inference import (
        decode_block,
        decode_dense,
        decode_layers,
        decode_mla,
        decode_moe,
        decode_shared,
        decode_step,
    )

    for name, module in list(model.named_modules()):
        if type(module) is nn.RMSNorm:
            model.set_submodule(name, GlueRMSNorm.sharing(module))
        elif isinstance(module, Attention):
            module.cached_attention = glue_cached_attention
            module.forward = functools.partial(decode_layers.attention_forward, module)
        elif type(module) is LatentAttention:  # (a subclass's forward: another computation)
            module.forward = functools.partial(decode_mla.latent_attention_forward, module)
        elif isinstance(module, MoELayer):
            module.forward = functools.partial(decode_moe.moe_forward, module)
            module.router.forward = functools.partial(decode_moe.router_forward, module.router)
            shared = module.shared_experts
            if type(shared) is SharedExperts:  # (another class: its own forward, called after)
                shared.forward = functools.partial(decode_shared.shared_forward, shared)
        elif type(module) is DenseFFN:  # (a subclass's forward: another computation)
            module.forward = functools.partial(decode_dense.dense_forward, module)
        elif type(module) is Block:  # (a subclass's forward would be another computation)
            module.forward = functools.partial(decode_block.block_forward, module)
    model.rope_memo = {}
    model.one_token_decoder = decode_step.one_token_decoder
    return model


def remove_decode_glue(model: MoETransformer) -> MoETransformer:
    """Undo `apply_decode_glue`: plain nn.RMSNorm, `cached_attention` and forwards again."""
    for name, module in list(model.named_modules()):
        if type(module) is GlueRMSNorm:
            plain = nn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
            plain.weight = module.weight
            model.set_submodule(name, plain.train(module.training))
        elif isinstance(
            module,
            Attention | LatentAttention | MoELayer | Router | Block | SharedExperts | DenseFFN,
        ):
            module.__dict__.pop("forward", None)  # the class's own forward again
            if isinstance(module, Attention):
                module.cached_attention = cached_attention
    model.rope_memo = None
    model.one_token_decoder = None
    return model


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f32, f64 = ctypes.c_float, ctypes.c_double
    routing = [i64, i32, i32, f32, i64, i64]  # top_k, sigmoid, normalize, scaling, groups, kept
    attention = [*[i64] * 5, f32, i64]  # filled, max_len, H, KV, hd, scale, window
    return cbuild.load(
        SOURCE,
        {
            "moekit_rmsnorm_f32": ([ptr, i64, i64, ptr, f64, ptr], None),
            "moekit_route_topk_f32": ([ptr, i64, ptr, *routing, *[ptr] * 3], None),
            "moekit_attend_one_f32": (
                [*[ptr] * 3, *[i64] * 3, *[ptr] * 4, *attention, ptr, ptr],
                None,
            ),
            "moekit_layers_set_ops": ([ptr] * 5, None),
            "moekit_layers_set_min_parallel": ([i64], i64),
            "moekit_experts_one_token": ([ptr, i64, *[ptr] * 6], i32),
            "moekit_moe_one_token": ([ptr, ptr, ptr, *routing, *[ptr] * 8], i32),
            "moekit_moe_tokens": ([ptr, i64, ptr, ptr, *routing, *[ptr] * 8], i32),
            "moekit_shared_tokens": ([ptr, i64, *[ptr] * 4], i32),
            "moekit_shared_parts": ([ptr, i64, i64, *[ptr] * 3], None),
            "moekit_dense_tokens": ([ptr, i64, *[ptr] * 3], i32),
            "moekit_attention_block": ([ptr, i64, *[ptr] * 5, *attention, ptr, ptr], i32),
            "moekit_plan_attention_one_token": ([*[ptr] * 4, i64, ptr], i32),
            "moekit_latent_attention_block": ([ptr, i64, *[ptr] * 5, i64, i64, i64, ptr, ptr], i32),
            "moekit_plan_one_token": ([*[ptr] * 4, i64, *[ptr] * 4], i32),
            "moekit_decode_tokens": (
                [ptr, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, f64, *[ptr] * 7],
                i32,
            ),
        },
        what="CPU decode glue",
        fallback="decoding runs torch's rms_norm and attention",
        flags=cbuild.EXACT_FLAGS,  # the rotary products and sums round as torch's do
    )
