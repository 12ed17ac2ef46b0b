"""`MoETransformer`: a decoder-only language model whose FFNs are dense SwiGLU or `MoELayer`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import ModelConfig
from moekit.model.attention import attention_mask
from moekit.model.block import Block
from moekit.model.mtp import MultiTokenPrediction, shift_left
from moekit.model.rope import rope_angles
from moekit.moe import MoEAux, MoELayer

if TYPE_CHECKING:
    from moekit.model.generation import KVCache

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    """What `MoETransformer.forward` returns.

    logits: (B, S, vocab_size).
    hidden: (B, S, D), the main model's hidden state after its final norm (what the head and the
        first MTP depth read).
    aux_loss: float32 scalar, the sum over MoE layers (the MTP blocks' included) of `aux.loss`.
    aux: one `MoEAux` per MoE layer, in layer order, then those of the MTP blocks when they ran.
    lm_loss: mean next-token cross-entropy over the labels that are not -100; None without labels.
    mtp_logits: with multi-token prediction run, depth k's (B, S, vocab_size) logits (k = 1..D),
        at position t scoring the token at t + k + 1; [] otherwise.
    mtp_losses: depth k's mean cross-entropy (mtp_target "tokens"; "model": KL from the main
        model's prediction, `distill_loss`) over the positions with a target (labels[:, t + k +
        1] not -100), unweighted; [] without labels or MTP.
    mtp_loss: (mtp_loss_weight / D) * sum(mtp_losses); None without labels or MTP.
    loss: lm_loss + aux_loss (+ mtp_loss), what to backpropagate; None without labels.
    """

    logits: Tensor
    hidden: Tensor
    aux_loss: Tensor
    aux: list[MoEAux] = field(default_factory=list)
    lm_loss: Tensor | None = None
    mtp_logits: list[Tensor] = field(default_factory=list)
    mtp_losses: list[Tensor] = field(default_factory=list)
    mtp_loss: Tensor | None = None
    loss: Tensor | None = None


class MoETransformer(nn.Module):
    """Token embedding, `cfg.n_layers` pre-RMSNorm blocks, final RMSNorm and LM head; with
    `cfg.mtp_depth`, the multi-token-prediction module `mtp` (`moekit.model.mtp`) after them.

    Build big models on the meta device and initialise them with one call:

        with torch.device("meta"):
            model = MoETransformer(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe_layers = set(cfg.moe_layer_indices)
        self.layers = nn.ModuleList(Block(cfg, i in moe_layers) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        # A tied head multiplies by embed.weight directly, so to_empty() cannot untie it.
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        # The tied head's product; moekit.inference.decode_kernels swaps in its own for generation.
        self.tied_head_linear: Callable[[Tensor, Tensor], Tensor] = F.linear
        self.mtp = MultiTokenPrediction(cfg)
        # The rotary angles of up to 4 positions by (start, count, device), when set to a dict
        # (generation sets one: moekit.inference.decode_glue); None computes them on every call.
        self.rope_memo: dict[tuple[int, int, torch.device], tuple[Tensor, Tensor]] | None = None
        # Generation's decode steps in one call, when set (moekit.inference.decode_glue sets
        # one): (model, cache) -> a function next ids (B, 1) -> logits (B, V), or None for a step
        # it cannot run; or None where the model does not qualify (`generation.step_logits`).
        self.one_token_decoder: Callable | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights; the projections that write into the residual stream (attention
        output, FFN down, experts' w_out) use std / sqrt(2 * n_layers) (GPT-2); norms to one,
        biases to zero, MoE balance state reset."""
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=std)
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=std)
        for depth in self.mtp:
            depth.init_weights(std, out_std)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        kv_cache: KVCache | None = None,
        *,
        with_aux: bool = True,
        mtp: bool | None = None,
        logits_to_keep: int | None = None,
    ) -> ModelOutput:
        """input_ids (B, S) long -> `ModelOutput` with logits (B, S, vocab_size).

        labels (B, S) are aligned with input_ids, as in `transformers`: the model shifts them, so
        the logits at position t are scored against labels[:, t + 1]; -100 marks a label to
        ignore. Pass `labels=input_ids` to train a language model.
        With `kv_cache`, input_ids continue the cached sequences: their positions start at
        `kv_cache.length`, and their keys and values are appended to the cache.
        with_aux=False skips the MoE layers' losses and metrics (`aux` is then empty and
        `aux_loss` 0): what generation passes.
        mtp: run the multi-token-prediction module (`mtp_logits`, and with labels `mtp_losses`,
        added to `loss`); None runs it when labels are given and the model has one.
        logits_to_keep: only the last positions' logits (B, min(logits_to_keep, S), V), as
        generation's prefill needs the last one's (the LM head of every position is wasted work).
        """
        self._check_input(input_ids, kv_cache)
        if logits_to_keep is not None and (labels is not None or logits_to_keep < 1):
            raise ValueError(
                f"logits_to_keep={logits_to_keep!r} is invalid: must be >= 1, and without labels "
                "(the loss scores every position)"
            )
        run_mtp = self._runs_mtp(mtp, labels, kv_cache)
        S = input_ids.shape[1]
        start = 0 if kv_cache is None else kv_cache.length
        cfg = self.cfg
        rope = self._rope(start, S, input_ids.device)
        # a dict, not a set: torch.compile cannot iterate a set (it ran this whole forward eagerly)
        windows = dict.fromkeys(cfg.layer_window(i) for i in range(cfg.n_layers))
        masks = {w: attention_mask(start, S, w, input_ids.device) for w in windows}
        x_BSD = self.embed(input_ids)
        aux: list[MoEAux] = []
        for i, block in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache.layers[i]
            mask = masks[cfg.layer_window(i)]
            x_BSD, layer_aux = block(x_BSD, rope, mask, cache, input_ids, with_aux)
            if layer_aux is not None:
                aux.append(layer_aux)
        h_BSD = self.norm(x_BSD)
        logits_BSV = self._head(h_BSD if logits_to_keep is None else h_BSD[:, -logits_to_keep:])
        mtp_logits: list[Tensor] = []
        if run_mtp:
            mask = masks[self._mtp_window]
            mtp_logits, mtp_aux = self.mtp(
                h_BSD, input_ids, rope, mask, self.embed, self._head, with_aux
            )
            aux += mtp_aux
        aux_loss = torch.zeros((), device=logits_BSV.device)
        if aux:
            aux_loss = torch.stack([a.loss.float() for a in aux]).sum()
        out = ModelOutput(logits_BSV, h_BSD, aux_loss, aux, mtp_logits=mtp_logits)
        if labels is not None:
            out.lm_loss = lm_loss(logits_BSV, labels)
            out.loss = out.lm_loss + aux_loss
            if mtp_logits:
                out.mtp_losses = [
                    lm_loss(logits, shift_left(labels, k, IGNORE_INDEX))
                    if cfg.mtp_target == "tokens"
                    else distill_loss(logits, logits_BSV, labels, k)
                    for k, logits in enumerate(mtp_logits, start=1)
                ]
                weight = cfg.mtp_loss_weight / cfg.mtp_depth
                out.mtp_loss = weight * torch.stack(out.mtp_losses).sum()
                out.loss = out.loss + out.mtp_loss
        return out

    def _runs_mtp(self, mtp: bool | None, labels: Tensor | None, kv_cache: object) -> bool:
        """Whether this forward runs the multi-token-prediction module."""
        if mtp is None:
            return labels is not None and self.cfg.mtp_depth > 0
        if mtp and self.cfg.mtp_depth == 0:
            raise ValueError("mtp=True needs a model with multi-token prediction (mtp_depth >= 1)")
        if mtp and kv_cache is not None:
            raise ValueError(
                "mtp=True with a kv_cache is not supported: a cached MTP depth runs through "
                "mtp_step(out.hidden, next_ids, kv_cache), once the next tokens are known"
            )
        return mtp

    def mtp_step(
        self, h_BSD: Tensor, next_ids_BS: Tensor, kv_cache: KVCache
    ) -> tuple[Tensor, Tensor]:
        """The first MTP depth continuing its own keys and values, `kv_cache.mtp`: h_BSD (B, S, D)
        the hidden states at the positions kv_cache.mtp.length onwards (the main model's after its
        final norm, `ModelOutput.hidden`, or this depth's own output when drafting further ahead),
        next_ids_BS (B, S) the token after each of them -> logits (B, S, vocab_size) scoring the
        token two after each position, and the depth's output hidden state (B, S, D). Position i
        sees what a full forward's depth 1 sees at i when its inputs are the same; speculative
        decoding drafts with it (`moekit.model.speculative`)."""
        cache = kv_cache.mtp
        if cache is None:
            raise ValueError(
                "kv_cache has no MTP layer: build it with KVCache.for_model(model, ..., mtp=True)"
            )
        start, S = cache.length, h_BSD.shape[1]
        rope = self._rope(start, S, h_BSD.device)
        mask = attention_mask(start, S, self._mtp_window, h_BSD.device)
        e_BSD = self.embed(next_ids_BS)
        h_BSD, _ = self.mtp[0](h_BSD, e_BSD, rope, mask, next_ids_BS, False, cache)
        return self._head(h_BSD), h_BSD

    def _rope(self, start: int, S: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The rotary angles of positions start .. start + S - 1."""
        memo = self.rope_memo if S <= 4 else None  # decode steps, speculative verifications
        if memo is not None and (start, S, device) in memo:  # the angles computed below, kept
            return memo[start, S, device]
        positions_S = torch.arange(start, start + S, device=device)
        cfg = self.cfg
        angles = rope_angles(positions_S, cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        if memo is not None:
            memo[start, S, device] = angles
        return angles

    @property
    def _mtp_window(self) -> int | None:
        """The MTP depths' attention window: the last layer's."""
        return self.cfg.layer_window(self.cfg.n_layers - 1)

    def _head(self, h_BSD: Tensor) -> Tensor:
        if self.lm_head is None:
            return self.tied_head_linear(h_BSD, self.embed.weight)
        return self.lm_head(h_BSD)

    def _check_input(self, input_ids: Tensor, kv_cache: KVCache | None) -> None:
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a (batch, seq) long tensor, got shape {tuple(input_ids.shape)} "
                f"and dtype {input_ids.dtype}"
            )
        end = input_ids.shape[1] + (0 if kv_cache is None else kv_cache.length)
        if end > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {end} positions is longer than max_seq_len={self.cfg.max_seq_len}"
            )

    def moe_layers(self, with_mtp: bool = False) -> list[MoELayer]:
        """The MoE layers of the main model, in layer order; `with_mtp` adds the MTP blocks'."""
        blocks = [*self.layers, *(depth.block for depth in self.mtp)] if with_mtp else self.layers
        return [block.ffn for block in blocks if isinstance(block.ffn, MoELayer)]

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step on every MoE layer, the MTP blocks' included (call after
        each optimizer step); a frozen router keeps its bias (`MoELayer.update_expert_bias`)."""
        for layer in self.moe_layers(with_mtp=True):
            layer.update_expert_bias()

    def num_parameters(self, active: bool = False, mtp: bool = True) -> int:
        """Total parameters, or with `active` those one token uses: all but the routed experts,
        plus top_k routed experts per MoE layer. A tied embedding counts once. mtp=False leaves
        out the multi-token-prediction module (as DeepSeek-V3's published 671B does)."""
        params = self.named_parameters()
        total = sum(p.numel() for name, p in params if mtp or not name.startswith("mtp."))
        if not active:
            return total
        for layer in self.moe_layers(with_mtp=mtp):
            routed = sum(p.numel() for p in layer.experts.parameters())
            total -= routed - routed // layer.cfg.n_experts * layer.cfg.top_k
        return total


def distill_loss(depth_BSV: Tensor, main_BSV: Tensor, labels_BS: Tensor, k: int) -> Tensor:
    """Mean float32 KL(main || depth) of MTP depth k's logits at position t against the main
    model's at t + k (detached: the target, not a path for gradients), both predicting token
    t + k + 1, over the positions t whose label t + k + 1 is not -100 (the positions the tokens
    target scores)."""
    keep_BS = shift_left(labels_BS, k + 1, IGNORE_INDEX) != IGNORE_INDEX  # label t + k + 1
    b, t = keep_BS.nonzero(as_tuple=True)
    log_q_NV = F.log_softmax(depth_BSV[b, t].float(), dim=-1)
    log_p_NV = F.log_softmax(main_BSV[b, t + k].detach().float(), dim=-1)
    return F.kl_div(log_q_NV, log_p_NV, log_target=True, reduction="batchmean")


def lm_loss(logits_BSV: Tensor, labels_BS: Tensor) -> Tensor:
    """Mean float32 cross-entropy of logits[:, t] against labels[:, t + 1], skipping -100."""
    # Shift the labels, not the logits: slicing (B, S, V) logits would copy them.
    targets_BS = F.pad(labels_BS[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(
        logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), ignore_index=IGNORE_INDEX
    )
