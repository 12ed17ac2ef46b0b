"""Multi-token prediction (DeepSeek-AI 2024, *DeepSeek-V3*, arXiv 2412.19437, section 2.2): D
extra depths, depth k predicting at position i the token i + k + 1.

Depth k takes the previous depth's hidden state h^{k-1}_i (h^0: the main model's) and the
embedding of token t_{i+k}:

    h'_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])     eh_proj: (d, 2d)
    h^k  = norm(Block(h'))                                          norm: shared_head.norm
    P^k_{i+k+1} = OutHead(h^k_i)

with the main model's embedding and head shared. The conventions follow the implementations that
load the released weights (checked in their sources):
- the embedding comes first in the concatenation (the paper writes [h ; Emb]): vLLM
  `vllm/model_executor/models/deepseek_mtp.py` (`torch.cat([inputs_embeds,
  previous_hidden_states])`), Megatron-Core `megatron/core/transformer/multi_token_prediction.py`
  (`torch.cat((decoder_input, hidden_states), -1)`), transformers 5.23 `modeling_layers.MtpLayer`;
  the checkpoint's eh_proj is (7168, 14336) either way, so only the order tells;
- h^0 is the main model's hidden state after its final norm: transformers' `MtpModel` drafts from
  `hidden_states[-1]` (the normed output, `generation/candidate_generator.py`), vLLM from the main
  model's normed output (torchtitan, which trains from scratch, takes it before the norm);
- depth k + 1 takes depth k's output after its `shared_head.norm`, as transformers' `MtpLayer`
  (`use_post_norm`) passes it on;
- the block is built like the model's others, MoE when the model has experts: the released layer
  61 is MoE, and transformers' `get_mtp_config` sets `first_k_dense_replace = 0` for it.

Within a training row the inputs are shifted left (torchtitan's and Megatron's `roll`): position i
of depth k embeds t_{i+k}, and the last k positions, which have no such token, embed token 0 and
have no target. Causal attention keeps them from touching the positions before them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.model.attention import AttentionMask, LayerKVCache
from moekit.model.block import Block
from moekit.model.init import init_children
from moekit.moe import MoEAux


def shift_left(x_BS: Tensor, k: int, fill: int) -> Tensor:
    """x_BS moved k positions left, the last k positions set to `fill`: out[:, i] = x[:, i + k]."""
    return F.pad(x_BS[:, k:], (0, k), value=fill)


class MTPDepth(nn.Module):
    """One depth: enorm, hnorm, eh_proj, a decoder block and the head's norm (DeepSeek-V3's
    `model.layers.{N}.enorm / hnorm / eh_proj / shared_head.norm` and the layer's block)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.enorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.hnorm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(cfg, is_moe=cfg.moe is not None)
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)

    def init_weights(self, std: float, out_std: float) -> None:
        init_children(self, std, out_std)

    def forward(
        self,
        h_BSD: Tensor,
        e_BSD: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        ids_BS: Tensor,
        with_aux: bool,
        cache: LayerKVCache | None = None,
    ) -> tuple[Tensor, MoEAux | None]:
        """h_BSD: the previous depth's (normed) hidden state; e_BSD: the embeddings of the
        shifted tokens ids_BS -> this depth's normed hidden state (B, S, D) and its block's aux.
        With `cache` (this depth's own keys and values) the call continues the positions cached
        so far, as a main block does (`MoETransformer.mtp_step`)."""
        x_BSD = self.eh_proj(torch.cat([self.enorm(e_BSD), self.hnorm(h_BSD)], dim=-1))
        x_BSD, aux = self.block(x_BSD, rope, mask, cache, ids_BS, with_aux)
        return self.norm(x_BSD), aux


class MultiTokenPrediction(nn.ModuleList):
    """The `cfg.mtp_depth` depths, run one after the other."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(MTPDepth(cfg) for _ in range(cfg.mtp_depth))

    def forward(
        self,
        h_BSD: Tensor,
        input_ids_BS: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttentionMask,
        embed: nn.Embedding,
        head: nn.Module,
        with_aux: bool = True,
    ) -> tuple[list[Tensor], list[MoEAux]]:
        """h_BSD: the main model's hidden state after its final norm -> each depth's logits
        (B, S, vocab_size), depth k's at position i scoring token i + k + 1, and the aux of the
        depths' MoE layers."""
        logits, aux = [], []
        for k, depth in enumerate(self, start=1):
            ids_BS = shift_left(input_ids_BS, k, 0)
            h_BSD, depth_aux = depth(h_BSD, embed(ids_BS), rope, mask, ids_BS, with_aux)
            logits.append(head(h_BSD))
            if depth_aux is not None:
                aux.append(depth_aux)
        return logits, aux
