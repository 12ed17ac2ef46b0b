"""One decoder block: x + attn(norm(x)), then x + ffn(norm(x)), the FFN dense or MoE."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.model.attention import Attention, AttentionMask, LayerKVCache
from moekit.model.init import init_children
from moekit.model.mla import LatentAttention
from moekit.moe import MoEAux, MoELayer


class DenseFFN(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): w_down(silu(w_gate x) * w_up x), no biases."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w_gate = nn.Linear(d_model, d_ff, bias=False)
        self.w_up = nn.Linear(d_model, d_ff, bias=False)
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        init_children(self, std, out_std, self.w_down)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """Pre-RMSNorm decoder block. `ffn` is a `MoELayer` when `is_moe`, else a `DenseFFN`; `attn`
    is grouped-query `Attention`, or `LatentAttention` when the config has `mla`."""

    def __init__(self, cfg: ModelConfig, is_moe: bool) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg) if cfg.mla is None else LatentAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if is_moe:
            assert cfg.moe is not None
            self.ffn: MoELayer | DenseFFN = MoELayer(cfg.moe)
        else:
            assert cfg.d_ff is not None
            self.ffn = DenseFFN(cfg.d_model, cfg.d_ff)

    def init_weights(self, std: float, out_std: float) -> None:
        init_children(self, std, out_std)

    def forward(
        self,
        x_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        cache: LayerKVCache | None = None,
        token_ids_BS: Tensor | None = None,
        with_aux: bool = True,
    ) -> tuple[Tensor, MoEAux | None]:
        """x_BSD (B, S, D) -> (B, S, D) and the MoE layer's aux (None for a dense block, or
        without with_aux). token_ids_BS: the input token ids, which a hash-routed MoE layer
        routes by. With a cache the call continues cached sequences: the MoE layer decodes
        (`MoELayer.forward`'s `decoding`)."""
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), rope, mask, cache)
        return self.feed_forward(x_BSD, token_ids_BS, with_aux, decoding=cache is not None)

    def feed_forward(
        self, x_BSD: Tensor, token_ids_BS: Tensor | None, with_aux: bool, decoding: bool
    ) -> tuple[Tensor, MoEAux | None]:
        """The block's second half: x + ffn(ffn_norm(x)) and the MoE layer's aux (`forward`'s;
        decoding: the rows continue cached sequences)."""
        h_BSD = self.ffn_norm(x_BSD)
        if isinstance(self.ffn, MoELayer):
            hashed = self.ffn.cfg.router == "hash"
            ids_BS = token_ids_BS if hashed else None
            y_BSD, aux = self.ffn(h_BSD, ids_BS, with_aux=with_aux, decoding=decoding)
            return x_BSD + y_BSD, aux
        return x_BSD + self.ffn(h_BSD), None
