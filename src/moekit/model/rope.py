"""Rotary position embeddings (Su et al. 2021, RoFormer), in the rotate-half layout that Hugging
Face Llama, Mixtral, Qwen and OLMoE checkpoints use: dimension i pairs with i + head_dim / 2.

The angles are computed per call in float32, as `transformers` does, rather than kept in buffers:
that costs a (S, head_dim / 2) outer product, and leaves nothing for `model.to(torch.bfloat16)`
to round or for a meta-device build to leave uninitialised.

YaRN (Peng et al. 2023) stretches the context: `yarn_inv_freq` and `yarn_attention_factor` follow
transformers' "yarn" rope type operation for operation, so the angles agree to the last bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moekit.config import RopeScaling


def rope_angles(
    positions_S: Tensor, head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[Tensor, Tensor]:
    """positions_S (S,) long -> (cos_SH, sin_SH), each (S, head_dim / 2) float32, for the
    frequencies theta^(-2i / head_dim), i = 0 .. head_dim / 2 - 1 (YaRN's with `scaling`, whose
    attention factor then multiplies cos and sin)."""
    device = positions_S.device
    if scaling is None:
        exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
        inv_freq_H = 1.0 / (theta ** (exponents / head_dim))
    else:
        inv_freq_H = yarn_inv_freq(head_dim, theta, scaling).to(device)
    angles_SH = positions_S.float()[:, None] * inv_freq_H[None, :]
    if scaling is None:
        return angles_SH.cos(), angles_SH.sin()
    factor = yarn_attention_factor(scaling)
    return angles_SH.cos() * factor, angles_SH.sin() * factor


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature term m = 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(s: RopeScaling) -> float:
    """The factor on cos and sin: given, else m(mscale) / m(mscale_all_dim), else m(1)."""
    if s.attention_factor is not None:
        return s.attention_factor
    if s.mscale and s.mscale_all_dim:
        return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim)
    return yarn_mscale(s.factor)


def yarn_inv_freq(dim: int, theta: float, s: RopeScaling) -> Tensor:
    """(dim / 2,) float32 YaRN frequencies: the fast dimensions keep theta^(-2i / dim), the slow
    ones are divided by `factor`, and a linear ramp between the correction dimensions blends
    them."""

    def correction_dim(rotations: float) -> float:
        turns = s.original_max_seq_len / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    keep = 1 - ramp
    return interpolation * (1 - keep) + extrapolation * keep


def deinterleave(x: Tensor) -> Tensor:
    """(..., d) with rotary pairs (x0, x1), (x2, x3) ... -> (x0, x2, ... | x1, x3, ...): the halves
    layout `apply_rope` rotates. Applied to queries and keys alike, it leaves their products
    unchanged (DeepSeek's interleaved RoPE)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def apply_rope(x_BHSd: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
    """Rotate x (B, heads, S, head_dim) by the angles of its S positions; same shape and dtype.

    The rotation is done in float32: bf16 angles lose the position information of long sequences.
    """
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_SH - x2 * sin_SH, x2 * cos_SH + x1 * sin_SH), dim=-1)
    return rotated.to(x_BHSd.dtype)
