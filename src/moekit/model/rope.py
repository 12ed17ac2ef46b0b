"""Rotary position embeddings (Su et al. 2021, RoFormer), in the rotate-half layout that Hugging
Face Llama, Mixtral, Qwen and OLMoE checkpoints use: dimension i pairs with i + head_dim / 2.

The angles are computed per call in float32, as `transformers` does, rather than kept in buffers:
that costs a (S, head_dim / 2) outer product, and leaves nothing for `model.to(torch.bfloat16)`
to round or for a meta-device build to leave uninitialised.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_angles(positions_S: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """positions_S (S,) long -> (cos_SH, sin_SH), each (S, head_dim / 2) float32, for the
    frequencies theta^(-2i / head_dim), i = 0 .. head_dim / 2 - 1."""
    exponents = torch.arange(0, head_dim, 2, device=positions_S.device, dtype=torch.float32)
    inv_freq_H = 1.0 / (theta ** (exponents / head_dim))
    angles_SH = positions_S.float()[:, None] * inv_freq_H[None, :]
    return angles_SH.cos(), angles_SH.sin()


def apply_rope(x_BHSd: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
    """Rotate x (B, heads, S, head_dim) by the angles of its S positions; same shape and dtype.

    The rotation is done in float32: bf16 angles lose the position information of long sequences.
    """
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos_SH - x2 * sin_SH, x2 * cos_SH + x1 * sin_SH), dim=-1)
    return rotated.to(x_BHSd.dtype)
