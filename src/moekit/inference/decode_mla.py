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

Where it does not apply the reference runs: no cache, more than MAX_ROWS new positions (a
prefill, whose expansion is done once per position anyway), gradients, tracing, a kv_b_proj that
is not a plain projection (nn.Linear or the kernels' KernelLinear, no bias) of x's dtype or a
quantized one, one with a hook (the latent path never calls it), a quantized one over fewer than
QUANTIZED_MIN_POSITIONS cached positions. Both paths write the cache alike, so a generation may
switch between them from one step to the next.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.inference.decode_glue import _hooked
from moekit.inference.decode_kernels import MAX_ROWS, KernelLinear
from moekit.model.attention import AttentionMask, LayerKVCache
from moekit.model.mla import LatentAttention
from moekit.quant.modules import QuantizedLinear

# A quantized kv_b_proj is dequantized whole each step (a layer's H (nope + v) Rkv weights): below
# this many cached positions that costs about what expanding them does or more, so the reference
# runs (latent_attention.py's model, int8 attention, the latent path at every length: 0.73x at 1,
# 0.96x at 8, 1.02x at 16, 1.21x at 32, 1.35x at 64; results/latent_attention_intel_threshold.json).
QUANTIZED_MIN_POSITIONS = 32


def _kv_b_weight(attn: LatentAttention, dtype: torch.dtype, positions: int) -> Tensor | None:
    """kv_b_proj's weight (H (nope + v), Rkv) in `dtype` for a step over `positions` cached
    positions: a plain projection's float matrix of that dtype as it is, a quantized one's
    dequantized (this step's copy; from QUANTIZED_MIN_POSITIONS on); None for anything else (a
    bias, a subclass or a forward of its own, a hook, which the latent path would bypass)."""
    proj, m = attn.kv_b_proj, attn.m
    shape = (attn.n_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    if proj.bias is not None or "forward" in proj.__dict__ or _hooked(proj):
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
