"""Multi-head latent attention's decode steps in the latent space (DeepSeek-V2's absorbed form),
swapped in for `LatentAttention.forward` by `decode_glue.apply_decode_glue`.

`LatentAttention.forward` expands every cached latent into per-head keys and values at each step:
kv_b_proj over all L cached positions, L Rkv H (nope + v) multiply-adds a layer and token (16.8M
a cached position for DeepSeek-V3's layers), so a decode step's cost grows with its context
hundreds of times faster than its attention's. A step of a few queries here folds kv_b_proj's key
rows into the queries and its value rows into the output instead (DeepSeek-AI 2024, *DeepSeek-V2*
§2.1.2; vLLM's and llama.cpp's MLA decoding do the same):

    q_lat = q_nope W_UK                  per head, W_UK (nope, Rkv): kv_b_proj's key rows
    scores = ([q_lat | q_rope] . [c | k_rope]) * scale   over the cached latents c (every head
                                         shares them: one product for all heads' queries)
    o_lat = softmax(scores) c            per head (Rkv)
    y = o_lat W_UV^T                     per head, W_UV (v, Rkv): kv_b_proj's value rows

the same attention in another order (the model dtype's rounding apart: float32's, or bfloat16's
in a bfloat16 model; tests/test_decode_mla.py), at H (2 Rkv + rope) multiply-adds a cached
position instead of Rkv H (nope + v) + H (qk + v), plus kv_b_proj's weight read once a layer and
step (dequantized where it is quantized).

A step of one position for at most MAX_ROWS sequences runs in one C call where its modules
qualify (`latent_weights`: decode-kernel projections, kv_b_proj float32 or quantized, the glue's
norms): decode_latent.h, the same algebra over the same products, its sums in float32
(tests/test_decode_mla.py holds it to this module's torch path).

Where neither applies the reference runs: no cache, more than MAX_ROWS new positions (a
prefill, whose expansion is done once per position anyway), gradients, tracing, a kv_b_proj that
is not a plain projection (nn.Linear or the kernels' KernelLinear, no bias) of x's dtype or a
quantized one, one with a hook (the latent path never calls it), a quantized one over fewer than
QUANTIZED_MIN_POSITIONS cached positions. Both paths write the cache alike, so a generation may
switch between them from one step to the next.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from moekit.inference.decode_glue import (
    _intercepted,
    _library,
    _plain,
    decode_position,
    decode_window,
)
from moekit.inference.decode_kernels import MAX_ROWS, KernelLinear
from moekit.inference.decode_layers import WeightRef, _cached, norm_args, ops_ready, projection_ref
from moekit.model.attention import AttentionMask, LayerKVCache
from moekit.model.mla import LatentAttention
from moekit.quant.modules import QuantizedLinear

# A quantized kv_b_proj is dequantized whole each step (a layer's H (nope + v) Rkv weights): below
# this many cached positions that costs about what expanding them does or more, so the reference
# runs (latent_attention.py's model, int8 attention, the latent path at every length: 0.73x at 1,
# 0.96x at 8, 1.02x at 16, 1.21x at 32, 1.35x at 64; results/latent_attention_intel_threshold.json).
QUANTIZED_MIN_POSITIONS = 32


class LatentRef(ctypes.Structure):
    """decode_latent.h's latent_ref: the projections (q, or q_a and q_b; kv_a, kv_b, o), the two
    norms' weights and eps, the heads and their parts' widths, the softmax scale, interleave."""

    _fields_ = [
        *((name, WeightRef) for name in ("q", "q_a", "q_b", "kv_a", "kv_b", "o")),
        ("q_a_norm", ctypes.c_void_p), ("kv_a_norm", ctypes.c_void_p), ("eps", ctypes.c_double),
        *((name, ctypes.c_int64) for name in ("H", "nope", "rope", "v", "R")),
        ("scale", ctypes.c_float), ("interleave", ctypes.c_int32),
    ]  # fmt: skip


def latent_modules(attn: LatentAttention) -> tuple[nn.Module, ...]:
    """The modules whose work the C call does: the projections and the two norms."""
    own = attn._modules
    names = ("q_proj", "q_a_proj", "q_a_norm", "q_b_proj", "kv_a_proj", "kv_a_norm", "kv_b_proj",
             "o_proj")  # fmt: skip
    return tuple(own[n] for n in names if own.get(n) is not None)


def latent_weights(attn: LatentAttention) -> LatentRef | None:
    """The attention's weights as the C call reads them, or None where one does not qualify;
    kept while they stay."""
    modules = (attn, *latent_modules(attn))
    extra = (*map(id, modules), attn.scale, attn.m, attn.n_heads,
             *(m.__dict__.get("eps") for m in modules))  # fmt: skip
    return _cached(attn, modules, lambda: _latent_refs(attn), extra)


def _latent_refs(attn: LatentAttention) -> LatentRef | None:
    m, H = attn.m, attn.n_heads
    qk, R, rope = m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank, m.qk_rope_head_dim
    low_rank = attn.q_proj is None
    projs = (attn.q_b_proj, attn.q_a_proj) if low_rank else (attn.q_proj,)
    refs = [projection_ref(p) for p in (*projs, attn.kv_a_proj, attn.kv_b_proj, attn.o_proj)]
    norms = [norm_args(attn.kv_a_norm, R)]
    if low_rank:
        norms.append(norm_args(attn.q_a_norm, m.q_lora_rank))
    if None in refs or None in norms or len({eps for _, eps in norms}) != 1:
        return None  # (one eps for both in C)
    q, *q_a, kv_a, kv_b, o = refs
    D = kv_a.I
    shapes = [(q.O, q.I), (kv_a.O, D), (kv_b.O, kv_b.I), (o.O, o.I)]
    want = [(H * qk, m.q_lora_rank if low_rank else D), (R + rope, D),
            (H * (m.qk_nope_head_dim + m.v_head_dim), R), (D, H * m.v_head_dim)]  # fmt: skip
    if shapes != want or kv_b.bias or rope % 2:  # (kv_b of any kind: decode_latent.h's float_row)
        return None
    if low_rank and (m.q_lora_rank, D) != (q_a[0].O, q_a[0].I):
        return None
    empty = WeightRef(-1, 0, 0, 0, None, None, None, None)
    q_a_norm = norms[1][0] if low_rank else None
    return LatentRef(
        empty if low_rank else q, q_a[0] if low_rank else empty, q if low_rank else empty,
        kv_a, kv_b, o, q_a_norm, norms[0][0], norms[0][1],
        H, m.qk_nope_head_dim, rope, m.v_head_dim, R, attn.scale, m.rope_interleave,
    )  # fmt: skip


def latent_floats(attn: LatentAttention, rows: int) -> int:
    """decode_latent.h's scratch for `rows` sequences' position."""
    m, H = attn.m, attn.n_heads
    low_rank = 0 if attn.q_proj is not None else m.q_lora_rank
    heads = H * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return rows * (heads + low_rank + m.kv_lora_rank + m.qk_rope_head_dim)


def latent_cache_qualifies(
    attn: LatentAttention, cache: LayerKVCache, B: int, rope: tuple[Tensor, Tensor]
) -> bool:
    """Whether the C call reads `cache` for B sequences: plain float32 latents (B, 1, L, Rkv) and
    rotary keys (B, 1, L, rope) with room left, the position's angles (1, rope / 2)."""
    m, (cos, sin) = attn.m, rope
    latent, k_rope = cache.k_BKLd, cache.v_BKLd
    return (
        all(_plain(t) for t in (latent, k_rope, cos, sin))
        and latent.shape[:2] == k_rope.shape[:2] == (B, 1)
        and latent.shape[2] == k_rope.shape[2] > cache.length
        and (latent.shape[3], k_rope.shape[3]) == (m.kv_lora_rank, m.qk_rope_head_dim)
        and cos.shape == sin.shape == (1, m.qk_rope_head_dim // 2)
    )


def _step_qualifies(
    attn: LatentAttention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
) -> bool:
    """What a step must be for the C call, its weights aside: one position of at most MAX_ROWS
    plain float32 rows, no gradient, not traced, a cache it reads (`latent_cache_qualifies`),
    every cached position attended or a sliding window's, nothing hooked."""
    return (
        decode_position(x_BSD, cache, mask)
        and not torch.is_grad_enabled()
        and latent_cache_qualifies(attn, cache, x_BSD.shape[0], rope)
        and not _intercepted(*latent_modules(attn))
        and ops_ready()
    )


def _c_step(
    attn: LatentAttention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache,
) -> Tensor | None:
    """The step in one C call (decode_latent.h), or None where it does not run."""
    refs = latent_weights(attn)
    if refs is None or x_BSD.shape[-1] != refs.kv_a.I:
        return None
    B = x_BSD.shape[0]
    scratch = x_BSD.new_empty(latent_floats(attn, B))
    out = x_BSD.new_empty(B, 1, refs.o.O)
    latent, k_rope = cache.k_BKLd, cache.v_BKLd
    status = _library().moekit_latent_attention_block(
        x_BSD.data_ptr(), B, ctypes.byref(refs), rope[0].data_ptr(), rope[1].data_ptr(),
        latent.data_ptr(), k_rope.data_ptr(), cache.length, latent.shape[2],
        decode_window(mask), scratch.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if status != 0:  # not counted in the cache: the torch path writes the position again
        return None
    cache.length += 1
    return out


def _kv_b_weight(attn: LatentAttention, dtype: torch.dtype, positions: int) -> Tensor | None:
    """kv_b_proj's weight (H (nope + v), Rkv) in `dtype` for a step over `positions` cached
    positions: a plain projection's float matrix of that dtype as it is, a quantized one's
    dequantized (this step's copy; from QUANTIZED_MIN_POSITIONS on); None for anything else (a
    bias, a subclass or a forward of its own, a hook, which the latent path would bypass)."""
    proj, m = attn.kv_b_proj, attn.m
    shape = (attn.n_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    if proj.bias is not None or _intercepted(proj):
        return None
    if type(proj) is QuantizedLinear and positions >= QUANTIZED_MIN_POSITIONS:
        weight = proj.weight_q.dequantize(dtype)
    elif type(proj) in (nn.Linear, KernelLinear) and proj.weight.dtype == dtype:
        weight = proj.weight.detach()
    else:
        return None
    return weight if weight.shape == shape and weight.is_contiguous() else None


def latent_attention_forward(
    attn: LatentAttention,
    x_BSD: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None = None,
) -> Tensor:
    """`LatentAttention.forward` for a decode step of at most MAX_ROWS positions with a cache, in
    the latent space (the module's docstring); the reference otherwise."""
    if _step_qualifies(attn, x_BSD, rope, mask, cache):
        out = _c_step(attn, x_BSD, rope, mask, cache)
        if out is not None:
            return out
    B, S, _ = x_BSD.shape
    weight = None
    decoding = cache is not None and S <= MAX_ROWS
    if decoding and not (torch.is_grad_enabled() or torch.compiler.is_compiling()):
        weight = _kv_b_weight(attn, x_BSD.dtype, cache.length + S)
    if weight is None:
        return LatentAttention.forward(attn, x_BSD, rope, mask, cache)
    m, H = attn.m, attn.n_heads
    nope, R = m.qk_nope_head_dim, m.kv_lora_rank
    q_nope_BHSn, q_rope_BHSr, latent_B1LR, k_rope_B1Lr = attn.latents(x_BSD, rope, cache)
    L = latent_B1LR.shape[2]
    w_HeR = weight.view(H, nope + m.v_head_dim, R)
    q_lat_BHSR = q_nope_BHSn @ w_HeR[:, :nope]  # (B, H, S, nope) @ (H, nope, R)
    q_BHSe = torch.cat([q_lat_BHSR, q_rope_BHSr], dim=-1)
    k_BLe = torch.cat([latent_B1LR, k_rope_B1Lr], dim=-1)[:, 0]
    scores_BHSL = (q_BHSe.reshape(B, H * S, -1) @ k_BLe.transpose(1, 2)).view(B, H, S, L)
    scores_BHSL = scores_BHSL * attn.scale
    allowed_SL = mask.allowed(S, L, x_BSD.device)
    probs_BHSL = scores_BHSL.masked_fill(~allowed_SL, float("-inf")).softmax(-1)
    o_lat_BHSR = (probs_BHSL.view(B, H * S, L) @ latent_B1LR[:, 0]).view(B, H, S, R)
    y_BHSv = o_lat_BHSR @ w_HeR[:, nope:].transpose(1, 2)  # (B, H, S, R) @ (H, R, v)
    return attn.o_proj(y_BHSv.transpose(1, 2).reshape(B, S, H * m.v_head_dim))
