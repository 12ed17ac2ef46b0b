"""Multi-head latent attention (DeepSeek-AI 2024, *DeepSeek-V2*; used by DeepSeek-V3).

Each token's keys and values are expanded per head from one low-rank latent c (kv_lora_rank wide),
and position enters through extra rotary dimensions ("decoupled RoPE") whose key is one vector
shared by every head. The KV cache therefore keeps only c and that rotary key per token:

    q = q_b_proj(RMSNorm(q_a_proj(x))) (or q_proj(x)) -> [q_nope | q_rope] per head
    c, k_rope = split(kv_a_proj(x));  c = RMSNorm(c)
    [k_nope | v] = kv_b_proj(c) per head;  k = [k_nope | RoPE(k_rope)]

The softmax scale is (qk_nope + qk_rope)^-0.5, times YaRN's m(mscale_all_dim)^2 when the config
asks for it, as transformers computes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.model.attention import AttentionMask
from moekit.model.init import init_children
from moekit.model.rope import apply_rope, deinterleave, yarn_mscale

if TYPE_CHECKING:
    from moekit.model.attention import LayerKVCache


class LatentAttention(nn.Module):
    """Multi-head latent attention, in the parameter layout of DeepSeek's checkpoints (nn.Linear).

    q_proj (H*qk, D) or q_a_proj (Rq, D), q_a_norm (Rq,), q_b_proj (H*qk, Rq);
    kv_a_proj (Rkv + rope, D), kv_a_norm (Rkv,), kv_b_proj (H*(nope + v), Rkv); o_proj (D, H*v).
    The KV cache holds the normalised latent (B, 1, L, Rkv) and the rotated key (B, 1, L, rope).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mla
        assert m is not None
        self.m, self.n_heads = m, cfg.n_heads
        # (qk_nope_head_dim + qk_rope_head_dim)^-0.5, times m(factor, mscale_all_dim)^2 with YaRN
        self.scale = m.qk_head_dim**-0.5
        s = cfg.rope_scaling
        if s is not None and s.mscale_all_dim:
            self.scale = self.scale * yarn_mscale(s.factor, s.mscale_all_dim) ** 2
        bias, H, D = bool(cfg.attn_bias), cfg.n_heads, cfg.d_model
        self.q_proj = self.q_a_proj = self.q_a_norm = self.q_b_proj = None
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=bias)
            self.q_a_norm = nn.RMSNorm(m.q_lora_rank, eps=m.latent_norm_eps)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=bias)
        self.kv_a_norm = nn.RMSNorm(m.kv_lora_rank, eps=m.latent_norm_eps)
        self.kv_b_proj = nn.Linear(
            m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(H * m.v_head_dim, D, bias=bias)

    def init_weights(self, std: float, out_std: float) -> None:
        init_children(self, std, out_std, self.o_proj)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """x_BSD (B, S, D), rope = (cos, sin) (S, qk_rope_head_dim / 2) -> (B, S, D)."""
        m, H = self.m, self.n_heads
        B, S, _ = x_BSD.shape
        q_nope, q_rope, latent_B1SR, k_rope_B1Sr = self.latents(x_BSD, rope, cache)
        L = latent_B1SR.shape[2]
        kv_BHLe = self.kv_b_proj(latent_B1SR).view(B, L, H, -1).transpose(1, 2)
        k_nope, v_BHLv = kv_BHLe.split([m.qk_nope_head_dim, m.v_head_dim], -1)
        k_BHLd = torch.cat([k_nope, k_rope_B1Sr.expand(-1, H, -1, -1)], dim=-1)
        q_BHSd = torch.cat([q_nope, q_rope], dim=-1)
        y_BHSv = F.scaled_dot_product_attention(
            q_BHSd,
            k_BHLd,
            v_BHLv,
            attn_mask=mask.mask_SL,
            is_causal=mask.is_causal,
            scale=self.scale,
        )
        return self.o_proj(y_BHSv.transpose(1, 2).reshape(B, S, -1))

    def latents(
        self, x_BSD: Tensor, rope: tuple[Tensor, Tensor], cache: LayerKVCache | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The queries' parts without and with position, q_nope (B, H, S, qk_nope_head_dim) and
        q_rope (B, H, S, qk_rope_head_dim) rotated; the normalised latents (B, 1, L, Rkv) and
        rotated keys (B, 1, L, qk_rope_head_dim) attended: the S new ones, after the cached ones
        where `cache` holds them (which it then holds too)."""
        m = self.m
        B, S, _ = x_BSD.shape
        q_nope, q_rope = self._queries(x_BSD).split([m.qk_nope_head_dim, m.qk_rope_head_dim], -1)
        latent, k_rope = self.kv_a_proj(x_BSD).split([m.kv_lora_rank, m.qk_rope_head_dim], -1)
        latent_B1SR = self.kv_a_norm(latent).view(B, 1, S, m.kv_lora_rank)
        k_rope_B1Sr = k_rope.view(B, 1, S, m.qk_rope_head_dim)
        if m.rope_interleave:
            q_rope, k_rope_B1Sr = deinterleave(q_rope), deinterleave(k_rope_B1Sr)
        q_rope, k_rope_B1Sr = apply_rope(q_rope, *rope), apply_rope(k_rope_B1Sr, *rope)
        if cache is not None:
            latent_B1SR, k_rope_B1Sr = cache.update(latent_B1SR, k_rope_B1Sr)
        return q_nope, q_rope, latent_B1SR, k_rope_B1Sr

    def _queries(self, x_BSD: Tensor) -> Tensor:
        """(B, H, S, qk_nope_head_dim + qk_rope_head_dim)."""
        B, S, _ = x_BSD.shape
        if self.q_proj is not None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BSD)))
        return q.view(B, S, self.n_heads, self.m.qk_head_dim).transpose(1, 2)
