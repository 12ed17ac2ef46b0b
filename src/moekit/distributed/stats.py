"""Batch statistics of an expert-parallel MoE layer: what its `aux` describes.

A layer's `aux` (balance losses, counts, MaxVio, dropped fraction, entropy) is computed by the
layer from the tokens of its own call. Under data or expert parallelism each process calls the
layer on its share of the global batch, so `BatchStats`, two forward hooks put on the layer from
outside, turns those figures into the ones the user asked for (`ParallelConfig.scope`):

"global": the figures one process would compute on the whole global batch (the tokens of every
    process of `group`, concatenated). One differentiable all-reduce per layer call sums the
    per-expert totals they are made of (routed and kept counts, summed router probabilities,
    importance and load, token-weighted z-loss and entropy); each loss is rebuilt from the sums,
    and `aux.loss` has the local terms swapped for the global ones. Every process then holds the
    same value; with gradients averaged over processes (DDP), each parameter's gradient is that
    of the global loss.
"local": the figures of this process's tokens (`aux.counts` is still per expert, all E of them).

In both scopes the routed counts that the aux-loss-free bias update reads are summed over
`group`, so every process moves its biases identically.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.distributed import ProcessGroup
from torch.utils.hooks import RemovableHandle

from moekit import losses
from moekit.distributed.comm import all_reduce_sum
from moekit.moe import MoEAux, MoELayer
from moekit.routing import Routing


class BatchStats:
    """Forward hooks on one MoE layer (and its router) that make its `aux` global or local."""

    def __init__(self, layer: MoELayer, group: ProcessGroup, scope: str) -> None:
        self.layer, self.group, self.scope = layer, group, scope
        self.routing: Routing | None = None
        self.handles: list[RemovableHandle] = [
            layer.router.register_forward_hook(self._keep_routing),
            layer.register_forward_hook(self._rewrite_aux, with_kwargs=True),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _keep_routing(self, module: Any, args: Any, routing: Routing) -> None:
        self.routing = routing

    def _rewrite_aux(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        y, aux = output
        routing, self.routing = self.routing, None
        assert routing is not None, "the layer's router did not run in this call"
        x = args[0] if args else kwargs["x"]
        n_seq = x.shape[0] if x.dim() == 3 else 1
        if self.scope == "global":
            return y, self.global_aux(aux, routing, n_seq)
        return y, self.local_aux(aux)

    def _sync_bias_counts(self, routed_E: Tensor, global_routed_E: Tensor) -> None:
        """The layer added its own routed counts; make it the sum over every process."""
        layer = self.layer
        if layer.training and layer.cfg.bias_update_rate > 0:
            layer.bias_counts += (global_routed_E - routed_E).to(layer.bias_counts.dtype)

    def local_aux(self, aux: MoEAux) -> MoEAux:
        """This process's figures, with counts over all E experts."""
        cfg = self.layer.cfg
        counts_E = losses.expert_counts(aux.ids, cfg.n_experts)
        assigned = aux.ids.shape[0] * cfg.top_k
        dropped = 1.0 - counts_E.sum().float() / max(assigned, 1)
        if self.layer.training and cfg.bias_update_rate > 0:
            routed = aux.routed_counts.double()
            self._sync_bias_counts(aux.routed_counts, all_reduce_sum(routed, self.group))
        return dataclasses.replace(aux, counts=counts_E, dropped_fraction=dropped)

    def global_aux(self, aux: MoEAux, routing: Routing, n_seq: int) -> MoEAux:
        """The figures of the global batch (see the module docstring)."""
        cfg = self.layer.cfg
        parts = self._local_sums(aux, routing, n_seq)
        sizes = [p.numel() for p in parts.values()]
        summed = all_reduce_sum(torch.cat([p.reshape(-1) for p in parts.values()]), self.group)
        tot = dict(zip(parts, summed.split(sizes), strict=True))
        T_all, B_all = tot["tokens"][0], tot["sequences"][0]
        routed_E, counts_E = tot["routed"].round().long(), tot["counts"].round().long()
        new = self._global_losses(aux, routing, tot, T_all, B_all)
        loss = aux.loss
        for name, coef in _COEFFICIENTS.items():
            if name in new:
                loss = loss + getattr(cfg, coef) * (new[name] - getattr(aux, name))
        self._sync_bias_counts(aux.routed_counts, routed_E)
        with torch.no_grad():
            dropped = 1.0 - counts_E.sum().float() / (T_all * cfg.top_k)
            max_vio = losses.max_violation(routed_E)
        entropy = (tot["entropy"][0] / T_all).to(aux.entropy.dtype)
        return dataclasses.replace(
            aux,
            loss=loss,
            counts=counts_E,
            routed_counts=routed_E,
            dropped_fraction=dropped.to(aux.dropped_fraction.dtype),
            max_vio=max_vio,
            entropy=entropy,
            **new,
        )

    def _local_sums(self, aux: MoEAux, routing: Routing, n_seq: int) -> dict[str, Tensor]:
        """What this process adds to the global sums (float64, gradients kept)."""
        cfg = self.layer.cfg
        assert routing.ids_TK is not None and routing.weights_TK is not None
        T = routing.n_tokens
        parts: dict[str, Tensor] = {
            "tokens": torch.tensor([T]),
            "sequences": torch.tensor([n_seq]),
            "routed": aux.routed_counts,
            "counts": losses.expert_counts(aux.ids, cfg.n_experts),
            "entropy": (aux.entropy * T).reshape(1).detach(),
        }
        if cfg.aux_loss_coef > 0 and cfg.aux_loss_scope == "sequence":
            parts["seq_balance"] = (aux.balance_loss * n_seq).reshape(1)
        elif cfg.aux_loss_coef > 0:
            parts["probs"] = routing.probs_TE.sum(0)
        if cfg.z_loss_coef > 0:
            parts["z"] = (aux.z_loss * T).reshape(1)
        if cfg.importance_loss_coef > 0:
            ids, w = routing.ids_TK.reshape(-1), routing.weights_TK.reshape(-1)
            parts["importance"] = w.new_zeros(cfg.n_experts).index_add(0, ids, w)
        if cfg.load_loss_coef > 0 and routing.clean_logits_TE is not None:
            assert routing.noise_std_TE is not None
            parts["load"] = losses.load_probabilities(
                routing.clean_logits_TE, routing.logits_TE, routing.noise_std_TE, cfg.top_k
            ).sum(0)
        device = routing.logits_TE.device
        return {k: v.to(device=device, dtype=torch.float64) for k, v in parts.items()}

    def _global_losses(
        self, aux: MoEAux, routing: Routing, tot: dict[str, Tensor], T_all: Tensor, B_all: Tensor
    ) -> dict[str, Tensor]:
        """Each loss the layer computed, over the global batch, in the layer's dtype."""
        cfg, dtype = self.layer.cfg, aux.loss.dtype
        new: dict[str, Tensor] = {}
        if "seq_balance" in tot:
            new["balance_loss"] = tot["seq_balance"][0] / B_all
        elif "probs" in tot:
            f_E = tot["routed"] / (T_all * cfg.top_k)
            P_E = tot["probs"] / T_all
            new["balance_loss"] = cfg.n_experts * (f_E * P_E).sum()
        if "z" in tot:
            new["z_loss"] = tot["z"][0] / T_all
        if "importance" in tot:
            new["importance_loss"] = losses.cv_squared(tot["importance"])
        if "load" in tot:
            new["load_loss"] = losses.cv_squared(tot["load"])
        return {k: v.to(dtype) for k, v in new.items()}


# The losses `MoELayer` weights into `aux.loss`, and the config field of each one's coefficient.
_COEFFICIENTS = {
    "balance_loss": "aux_loss_coef",
    "z_loss": "z_loss_coef",
    "importance_loss": "importance_loss_coef",
    "load_loss": "load_loss_coef",
}
