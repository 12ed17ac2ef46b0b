"""Rotary position embeddings (Su et al. 2021, RoFormer), in the rotate-half layout that Hugging
Face Llama, Mixtral, Qwen and OLMoE checkpoints use: dimension i pairs with i + head_dim / 2."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """Holds cos and sin tables (max_seq_len, head_dim / 2) as non-persistent float32 buffers.

    The tables are derived data: `init_weights()` recomputes them, which a model built on the meta
    device and moved with `to_empty()` needs (its buffers hold garbage until then).
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim // 2), persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        device = self.cos.device
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float64)
        inv_freq = self.theta ** (-exponents / self.head_dim)
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float64)
        angles_SH = torch.outer(positions, inv_freq)
        self.cos.copy_(angles_SH.cos())
        self.sin.copy_(angles_SH.sin())

    def forward(self, positions_S: Tensor) -> tuple[Tensor, Tensor]:
        """positions_S (S,) long -> (cos_SH, sin_SH), each (S, head_dim / 2) float32."""
        return self.cos[positions_S], self.sin[positions_S]


def apply_rope(x_BHSd: Tensor, cos_SH: Tensor, sin_SH: Tensor) -> Tensor:
    """Rotate x (B, heads, S, head_dim) by the angles of its S positions; same shape and dtype.

    The rotation is done in float32: bf16 angles lose the position information of long sequences.
    """
    x1, x2 = x_BHSd.float().chunk(2, dim=-1)
    cos, sin = cos_SH.float(), sin_SH.float()
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x_BHSd.dtype)
