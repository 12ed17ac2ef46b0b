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
import threading
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from moekit import cbuild
from moekit.experts.experts import Experts
from moekit.inference.decode_qkv import fuse_qkv, fused_qkv, linear_of, unfuse_qkv
from moekit.model.attention import Attention, AttentionMask, LayerKVCache, cached_attention
from moekit.model.transformer import MoETransformer
from moekit.moe import MoEAux, MoELayer

SOURCE = Path(__file__).with_name("decode_glue.c")
MAX_ROWS = 16  # decode steps; more rows are torch's (its vectorised kernels win there)
# -ffp-contract=off: the rotary products and sums round one by one, as torch's do.
FLAGS = (*cbuild.FLAGS, "-ffp-contract=off")


def _plain(t: Tensor) -> bool:
    return cbuild.plain_cpu(t, torch.float32) and t.is_contiguous()


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook or pre-hook, global or of one of `modules`, waits for a call that
    a glued forward would not make (it runs their products itself): it then runs the reference,
    which calls them (a `TraceRecorder`'s hooks on the routers and experts, say)."""
    return bool(
        torch_module._global_forward_hooks
        or torch_module._global_forward_pre_hooks
        or any(m._forward_hooks or m._forward_pre_hooks for m in modules)
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
    KV = cache.k_BKLd.shape[1]
    y_BHSd = torch.empty_like(q_BHSd)
    q, k, v = q_BHSd.data_ptr(), k_BKSd.data_ptr(), v_BKSd.data_ptr()
    _attend(q, k, v, H * hd, KV * hd, rope, cache, B, H, hd, y_BHSd)
    return y_BHSd


def _attend(
    q: int,
    k: int,
    v: int,
    q_stride: int,
    kv_stride: int,
    rope: tuple[Tensor, Tensor],
    cache: LayerKVCache,
    B: int,
    H: int,
    hd: int,
    out: Tensor,
) -> None:
    """The C attention step (qualification checked by the caller): q, k, v addresses, sequence b's
    q at q + 4 * b * q_stride (k, v likewise with kv_stride); appends to `cache`; writes out."""
    KV, max_len = cache.k_BKLd.shape[1], cache.k_BKLd.shape[2]
    cos, sin = rope
    _library().moekit_attend_one_f32(
        q,
        k,
        v,
        q_stride,
        kv_stride,
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
        out.data_ptr(),
    )
    cache.length += 1


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
    B, H, _, hd = q.shape
    KV = k.shape[1]
    return (
        _eager_no_grad(q, k, v)
        and all(_plain(t) for t in (q, k, v))
        and k.shape == v.shape == (B, KV, 1, hd)
        and H % KV == 0
        and _cache_qualifies(cache, B, KV, hd, rope)
    )


def glue_attention_forward(
    attn: Attention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None = None,
) -> Tensor:
    """`Attention.forward` for one decode position in three calls (the fused q/k/v product, the C
    attention step, o_proj) where it qualifies (projections still fused (`fused_qkv`) and not
    hooked, no q/k norms or clipping, the C attention's conditions); `Attention.forward` itself
    otherwise."""
    w, q_linear = fused_qkv(attn, "weight"), linear_of(attn.q_proj)
    b = fused_qkv(attn, "bias") if attn.q_proj.bias is not None else None
    B, S, D = x_BSD.shape
    if (
        w is None
        or q_linear is None
        or (b is None and attn.q_proj.bias is not None)
        or S != 1
        or attn.qk_norm is not None
        or attn.clip_qkv is not None
        or attn.sinks is not None
        or cache is None
        or mask.mask_SL is not None
        or not _eager_no_grad(x_BSD, attn.q_proj.weight, attn.o_proj.weight)
        or not _plain(x_BSD)
        or not _cache_qualifies(cache, B, attn.n_kv_heads, attn.head_dim, rope)
        or _hooked(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
    ):
        return Attention.forward(attn, x_BSD, rope, mask, cache)
    H, KV, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    qkv_BO = q_linear(x_BSD.view(B, D), w, b)
    y_BHd = qkv_BO.new_empty(B, H * hd)
    q, row = qkv_BO.data_ptr(), qkv_BO.shape[1]
    k = q + 4 * H * hd
    _attend(q, k, k + 4 * KV * hd, row, row, rope, cache, B, H, hd, y_BHd)
    o_linear = linear_of(attn.o_proj)
    if o_linear is None:
        return attn.o_proj(y_BHd.view(B, 1, H * hd))
    return o_linear(y_BHd, attn.o_proj.weight, attn.o_proj.bias).view(B, 1, D)


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


def glue_moe_forward(
    layer: MoELayer,
    x: Tensor,
    token_ids: Tensor | None = None,
    *,
    with_aux: bool = True,
    decoding: bool = False,
) -> tuple[Tensor, MoEAux | None]:
    """`MoELayer.forward` for one decoded token without aux where it qualifies (an eval-mode
    layer, top-k routing without expert groups, the decode path of `selected_path`, float32):
    the router's product, then the C top-k routing into two small ctypes buffers (no tensors, no
    host sync) and the chosen experts summed by increasing expert, as `selected_experts_forward`
    does. `MoELayer.forward` itself otherwise (and where the router or experts are hooked)."""
    cfg, router = layer.cfg, layer.router
    T = x.numel() // cfg.d_model if x.dim() > 0 else 0
    if (
        with_aux
        or T != 1
        or layer.training
        or cfg.router != "topk"
        or not (cfg.n_groups == 1 or cfg.topk_groups == cfg.n_groups)
        or x.shape[-1] != cfg.d_model
        or not layer.selected_path(1, decoding)
        or torch.is_grad_enabled()  # generation's no_grad only: no cached view joins a graph
        or torch.compiler.is_compiling()
        or not (_plain(x) and _plain(router.weight) and _plain(router.expert_bias))
        or (router.bias is not None and not _plain(router.bias))
        or _library() is None
        or _hooked(router, layer.experts)  # the layer's own hooks see this call as any other
    ):
        return MoELayer.forward(layer, x, token_ids, with_aux=with_aux, decoding=decoding)
    x_TD = x.view(1, cfg.d_model)
    logits_TE = router.linear(x_TD, router.weight, router.bias)
    K, E = cfg.top_k, cfg.n_experts
    scores, ids_K, weights_K = _route_buffers(E, K)
    _library().moekit_route_topk_f32(
        logits_TE.data_ptr(),
        E,
        router.expert_bias.data_ptr(),
        K,
        cfg.score == "sigmoid",
        cfg.normalize,
        cfg.routed_scaling,
        scores,
        ids_K,
        weights_K,
    )
    experts = layer.experts
    chosen = sorted(zip(ids_K, weights_K, strict=True))
    if type(experts) is Experts:
        views = _expert_views(experts)
        y_TD = None
        for e, w in chosen:  # float32 products by the float32 weight, summed as the reference
            y_e = experts.expert_ffn(x_TD, *views[e], cfg)
            y_TD = y_e * w if y_TD is None else y_TD.add_(y_e * w)
    else:  # offloaded experts, say: their own decode path
        ids_TK = torch.tensor([list(ids_K)], device=x.device)
        weights_TK = torch.tensor([list(weights_K)], device=x.device)
        y_TD = experts.forward_selected(x_TD, ids_TK, weights_TK)
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_experts(x_TD)
    return y_TD.view(x.shape), None


def _expert_views(experts: Experts) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
    """Each expert's (w_in[e], w_out[e], b_in[e], b_out[e]), made once and kept while the stacked
    parameters are the same tensors over the same memory (the selects cost ~2 us each a step)."""
    params = (experts.w_in, experts.w_out, experts.b_in, experts.b_out)
    key = tuple((id(p), p.data_ptr()) if p is not None else None for p in params)
    kept = experts.__dict__.get("_glue_views")
    if kept is None or kept[0] != key:
        views = [
            tuple(None if p is None else p[e] for p in params) for e in range(experts.w_in.shape[0])
        ]
        kept = experts.__dict__["_glue_views"] = (key, views)
    return kept[1]


_scratch = threading.local()


def _route_buffers(E: int, K: int) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array]:
    """Scratch scores (E,), ids (K,) and weights (K,) for `moekit_route_topk_f32`, this thread's:
    the ctypes call releases the GIL, so threads decoding at once (one model or several) each
    need their own; one thread's calls each read their results before the next, so its layers
    and models share them. (Per layer would still race with two threads on one model.)"""
    kept = _scratch.__dict__.setdefault("buffers", {})
    if (E, K) not in kept:
        kept[E, K] = (ctypes.c_float * E)(), (ctypes.c_int64 * K)(), (ctypes.c_float * K)()
    return kept[E, K]


def apply_decode_glue(
    model: MoETransformer, fuse_qkv_weights: bool = False, route_in_c: bool = False
) -> MoETransformer:
    """Swap the glue into `model` for generation, in place: every nn.RMSNorm becomes a
    `GlueRMSNorm` sharing its weight, and every `Attention` (the MTP blocks' too; not latent
    attention) runs `glue_cached_attention`. Returns `model`; `remove_decode_glue` undoes it.
    `fuse_qkv_weights`: q/k/v's weights become views of one stacked tensor, one product a step;
    off by default, since safetensors then refuses to save the model (partial views of one
    storage) until `remove_decode_glue`. `route_in_c`: one token's top-k routing in C
    (`glue_moe_forward`); off by default, since its softmax rounds differently from torch's in the
    last bit, and a model whose layers fall back to torch (hooked, offloaded with hooks) would then
    not reproduce a glued one's tokens bit for bit."""
    for name, module in list(model.named_modules()):
        if type(module) is nn.RMSNorm:
            model.set_submodule(name, GlueRMSNorm.sharing(module))
        elif isinstance(module, Attention):
            module.cached_attention = glue_cached_attention
            if fuse_qkv_weights and fuse_qkv(module):
                module.forward = functools.partial(glue_attention_forward, module)
        elif isinstance(module, MoELayer) and route_in_c:
            module.forward = functools.partial(glue_moe_forward, module)
    model.rope_memo = {}
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
            module.__dict__.pop("forward", None)
            unfuse_qkv(module)
        elif isinstance(module, MoELayer):
            module.__dict__.pop("forward", None)
            module.experts.__dict__.pop("_glue_views", None)
    model.rope_memo = None
    return model


@functools.cache
def _library() -> ctypes.CDLL | None:
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    return cbuild.load(
        SOURCE,
        {
            "moekit_rmsnorm_f32": ([ptr, i64, i64, ptr, ctypes.c_double, ptr], None),
            "moekit_route_topk_f32": (
                [ptr, i64, ptr, i64, ctypes.c_int, ctypes.c_int, ctypes.c_float, *[ptr] * 3],
                None,
            ),
            "moekit_attend_one_f32": (
                [*[ptr] * 3, i64, i64, *[ptr] * 4, *[i64] * 6, ctypes.c_float, ptr],
                None,
            ),
        },
        what="CPU decode glue",
        fallback="decoding runs torch's rms_norm and attention",
        flags=FLAGS,
    )
