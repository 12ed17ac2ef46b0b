"""Causal self-attention with grouped-query heads, RoPE, an optional sliding window and q/k norms,
computed by `torch.nn.functional.scaled_dot_product_attention`; with attention sinks (GPT-OSS),
by the explicit softmax that takes the sink logits into its denominator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.model.init import init_children
from moekit.model.rope import apply_rope


@dataclass
class AttentionMask:
    """How the queries of one call may attend: `mask_SL` (S queries, L keys; True = may attend),
    or None with `is_causal` (plain causal from position 0) or without (every cached key);
    `window`: the sliding window mask_SL spells out (causal, each query's last `window` keys),
    None where it is not a window's."""

    mask_SL: Tensor | None
    is_causal: bool
    window: int | None = None

    def allowed(self, n_queries: int, n_keys: int, device: torch.device) -> Tensor:
        """The (S, L) boolean mask spelled out (True = may attend)."""
        if self.mask_SL is not None:
            return self.mask_SL
        every_SL = torch.ones(n_queries, n_keys, dtype=torch.bool, device=device)
        return every_SL.tril() if self.is_causal else every_SL


def attention_mask(
    start: int, n_new: int, window: int | None, device: torch.device | str | None = None
) -> AttentionMask:
    """The mask for queries at positions start .. start+n_new-1 over keys 0 .. start+n_new-1.

    Query q may attend to key k when k <= q and, with a sliding window W, q - k < W.
    """
    n_keys = start + n_new
    if window is None or window >= n_keys:
        if start == 0:
            return AttentionMask(None, is_causal=True)
        if n_new == 1:
            return AttentionMask(None, is_causal=False)
    q_S1 = torch.arange(start, n_keys, device=device)[:, None]
    k_1L = torch.arange(n_keys, device=device)[None, :]
    allowed_SL = k_1L <= q_S1
    if window is not None:
        allowed_SL = allowed_SL & (q_S1 - k_1L < window)
    return AttentionMask(allowed_SL, is_causal=False, window=window)


class Attention(nn.Module):
    """Multi-head attention with n_kv_heads key/value heads shared by groups of query heads.

    q_proj (H*hd, D), k_proj and v_proj (KV*hd, D), o_proj (D, H*hd) in nn.Linear layout; q_norm and
    k_norm are RMSNorms over each head (qk_norm="head") or the whole projection ("full"); sinks
    (H,) are the per-head sink logits (attn_sinks).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.d_head
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        qkv_bias = bool(cfg.attn_bias)
        self.q_proj = nn.Linear(cfg.d_model, q_width, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_width, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_width, bias=qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.d_model, bias=cfg.attn_bias is True)
        self.sinks = nn.Parameter(torch.empty(self.n_heads)) if cfg.attn_sinks else None
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        self.q_norm = self.k_norm = None
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = nn.RMSNorm(self.head_dim if per_head else q_width, eps=cfg.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim if per_head else kv_width, eps=cfg.norm_eps)
        # Rope, cache write and attention; moekit.inference.decode_glue swaps in a one-call C
        # version for decode steps (`cached_attention` stays its reference).
        self.cached_attention: Callable[..., Tensor] = cached_attention

    def init_weights(self, std: float, out_std: float) -> None:
        init_children(self, std, out_std, self.o_proj)
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
    ) -> Tensor:
        """x_BSD (B, S, D), rope = (cos_SH, sin_SH) of the S positions -> (B, S, D).

        With a cache, the new keys and values are written at the cache's position and the queries
        attend over everything cached so far (as `mask` allows).
        """
        q_BHSd, k_BKSd, v_BKSd = self._project(x_BSD)
        y_BHSd = self.cached_attention(q_BHSd, k_BKSd, v_BKSd, rope, mask, cache, self.sinks)
        B, S, _ = x_BSD.shape
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, -1))

    def _project(self, x_BSD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, S, hd), k and v (B, KV, S, hd), with the q/k norms applied."""
        B, S, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            c = self.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


def cached_attention(
    q_BHSd: Tensor,
    k_BKSd: Tensor,
    v_BKSd: Tensor,
    rope: tuple[Tensor, Tensor],
    mask: AttentionMask,
    cache: LayerKVCache | None,
    sinks_H: Tensor | None = None,
) -> Tensor:
    """The attention of S new positions, projected: q (B, H, S, hd), k and v (B, KV, S, hd) before
    the rotary embedding, rope = (cos_SH, sin_SH) -> (B, H, S, hd). Rotates q and k, appends k and
    v to the cache (when given) and attends over everything cached so far (as `mask` allows),
    with the sink logits sinks_H (H,) when given."""
    q_BHSd = apply_rope(q_BHSd, *rope)
    k_BKSd = apply_rope(k_BKSd, *rope)
    if cache is not None:
        k_BKSd, v_BKSd = cache.update(k_BKSd, v_BKSd)
    if sinks_H is not None:
        return sink_attention(q_BHSd, k_BKSd, v_BKSd, mask, sinks_H)
    return F.scaled_dot_product_attention(
        q_BHSd,
        k_BKSd,
        v_BKSd,
        attn_mask=mask.mask_SL,
        is_causal=mask.is_causal,
        enable_gqa=k_BKSd.shape[1] != q_BHSd.shape[1],
    )


def sink_attention(
    q_BHSd: Tensor, k_BKLd: Tensor, v_BKLd: Tensor, mask: AttentionMask, sinks_H: Tensor
) -> Tensor:
    """Softmax attention whose denominator also holds one learned logit per head, the sink, which
    carries no value (GPT-OSS). Written as transformers' eager GPT-OSS attention, in its order of
    operations: (B, H, S, hd) queries over (B, KV, L, hd) keys and values -> (B, H, S, hd)."""
    B, H, S, hd = q_BHSd.shape
    group = H // k_BKLd.shape[1]
    k_BHLd = k_BKLd.repeat_interleave(group, dim=1)
    v_BHLd = v_BKLd.repeat_interleave(group, dim=1)
    scores_BHSL = torch.matmul(q_BHSd, k_BHLd.transpose(2, 3)) * hd**-0.5
    allowed_SL = mask.allowed(S, k_BHLd.shape[2], q_BHSd.device)
    scores_BHSL = scores_BHSL.masked_fill(~allowed_SL, float("-inf"))
    sinks = sinks_H.to(scores_BHSL.dtype).reshape(1, H, 1, 1).expand(B, H, S, 1)
    logits = torch.cat([scores_BHSL, sinks], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs_BHSL = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs_BHSL.to(v_BHLd.dtype), v_BHLd)


class LayerKVCache:
    """One layer's keys and values, preallocated (B, KV, max_len, hd); `length` are filled."""

    def __init__(self, k_BKLd: Tensor, v_BKLd: Tensor) -> None:
        self.k_BKLd, self.v_BKLd = k_BKLd, v_BKLd
        self.length = 0

    def update(self, k_BKSd: Tensor, v_BKSd: Tensor) -> tuple[Tensor, Tensor]:
        """Append S new positions; return all keys and values so far (B, KV, length, hd)."""
        end = self.length + k_BKSd.shape[2]
        if end > self.k_BKLd.shape[2]:
            raise ValueError(f"KV cache overflow: {end} positions, room for {self.k_BKLd.shape[2]}")
        self.k_BKLd[:, :, self.length : end] = k_BKSd
        self.v_BKLd[:, :, self.length : end] = v_BKSd
        self.length = end
        return self.k_BKLd[:, :, :end], self.v_BKLd[:, :, :end]

    def crop(self, length: int) -> None:
        """Keep the first `length` positions (at most those filled): later ones are overwritten."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a KV cache of {self.length} positions to {length}")
        self.length = length
