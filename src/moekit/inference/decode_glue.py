"""CPU decode glue: the per-token ops between a decode step's products, in C (`decode_glue.c`),
swapped into a built model for generation by `apply_decode_glue(model)`, next to the products'
kernels (`moekit.inference.decode_kernels`).

A batch-1 decode step of a small model on this project's machine (AMD EPYC, 2 cores) is mostly
framework overhead: ~4 us an op, and torch's rms_norm is a composite of ~6 of them (~16 us for 64
numbers), a step's attention ~25 (rope of q and k, the cache's slice writes, SDPA with its OpenMP
fork, views). Here each is one ctypes call:

- `rms_norm`: nn.RMSNorm over at most MAX_ROWS rows (`GlueRMSNorm` swaps it in for nn.RMSNorm);
- `glue_cached_attention`: one new position's rope, cache write and attention over every cached
  position (`Attention.cached_attention`; decode steps with the plain mask, no sinks).

Anything else (training, gradients, other dtypes, prefill, sliding windows that bite, sinks,
`torch.compile` tracing) runs the torch reference: nn.RMSNorm and
`moekit.model.attention.cached_attention`. Outputs agree with it to float32 rounding
(tests/test_decode_fast_paths.py). Built with the system C compiler through `moekit.cbuild`
(MOEKIT_NO_KERNELS=1, or no compiler, leaves the references).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from moekit import cbuild
from moekit.model.attention import Attention, AttentionMask, LayerKVCache, cached_attention
from moekit.model.transformer import MoETransformer

SOURCE = Path(__file__).with_name("decode_glue.c")
MAX_ROWS = 16  # decode steps; more rows are torch's (its vectorised kernels win there)
# -ffp-contract=off: the rotary products and sums round one by one, as torch's do.
FLAGS = (*cbuild.FLAGS, "-ffp-contract=off")


def _plain(t: Tensor) -> bool:
    return cbuild.plain_cpu(t, torch.float32) and t.is_contiguous()


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
        or not (_plain(x) and _plain(weight) and weight.shape == (D,))
        or x.numel() > MAX_ROWS * D
        or x.numel() == 0
        or _library() is None
    ):
        return torch.rms_norm(x, (D,), weight, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
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
    position it may attend (mask without an explicit matrix), no sinks; the reference otherwise."""
    if not _attention_qualifies(q_BHSd, k_BKSd, v_BKSd, rope, mask, cache, sinks_H):
        return cached_attention(q_BHSd, k_BKSd, v_BKSd, rope, mask, cache, sinks_H)
    assert cache is not None
    B, H, _, hd = q_BHSd.shape
    KV, max_len = cache.k_BKLd.shape[1], cache.k_BKLd.shape[2]
    cos, sin = rope
    y_BHSd = torch.empty_like(q_BHSd)
    _library().moekit_attend_one_f32(
        q_BHSd.data_ptr(),
        k_BKSd.data_ptr(),
        v_BKSd.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        cache.k_BKLd.data_ptr(),
        cache.v_BKLd.data_ptr(),
        cache.length,
        max_len,
        B,
        H,
        KV,
        hd,
        hd**-0.5,
        y_BHSd.data_ptr(),
    )
    cache.length += 1
    return y_BHSd


def _attention_qualifies(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
    sinks: Tensor | None,
) -> bool:
    if cache is None or sinks is not None or mask.mask_SL is not None or q.shape[2] != 1:
        return False
    cos, sin = rope
    ck, cv = cache.k_BKLd, cache.v_BKLd
    B, H, _, hd = q.shape
    return (
        _eager_no_grad(q, k, v)
        and all(_plain(t) for t in (q, k, v, cos, sin, ck, cv))
        and k.shape == v.shape == (B, ck.shape[1], 1, hd)
        and ck.shape == cv.shape
        and ck.shape[0] == B
        and ck.shape[3] == hd
        and H % ck.shape[1] == 0
        and hd % 2 == 0
        and cos.shape == sin.shape == (1, hd // 2)
        and cache.length < ck.shape[2]  # room left (the reference raises the overflow)
        and _library() is not None
    )


def apply_decode_glue(model: MoETransformer) -> MoETransformer:
    """Swap the glue into `model` for generation, in place: every nn.RMSNorm becomes a
    `GlueRMSNorm` sharing its weight, and every `Attention` (the MTP blocks' too; not latent
    attention) runs `glue_cached_attention`. Returns `model`; `remove_decode_glue` undoes it."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.RMSNorm:
            model.set_submodule(name, GlueRMSNorm.sharing(module))
        elif isinstance(module, Attention):
            module.cached_attention = glue_cached_attention
    return model


def remove_decode_glue(model: MoETransformer) -> MoETransformer:
    """Undo `apply_decode_glue`: plain nn.RMSNorm and `cached_attention` again."""
    for name, module in list(model.named_modules()):
        if type(module) is GlueRMSNorm:
            plain = nn.RMSNorm(module.normalized_shape, module.eps, module.elementwise_affine)
            plain.weight = module.weight
            model.set_submodule(name, plain.train(module.training))
        elif isinstance(module, Attention):
            module.cached_attention = cached_attention
    return model


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return cbuild.load(
        SOURCE,
        {
            "moekit_rmsnorm_f32": ([ptr, i64, i64, ptr, ctypes.c_double, ptr], None),
            "moekit_attend_one_f32": (
                [*[ptr] * 7, *[i64] * 6, ctypes.c_float, ptr],
                None,
            ),
        },
        what="CPU decode glue",
        fallback="decoding runs torch's rms_norm and attention",
        flags=FLAGS,
    )
