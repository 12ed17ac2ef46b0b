"""`MoELayer` = router + dispatch + experts (+ shared experts), returning its output and `aux`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import DroplessDispatcher, make_dispatcher
from moekit.dispatch.capacity import token_capacity
from moekit.dispatch.reference import reference_capacity_assignment
from moekit.experts import Experts, SharedExperts, activate
from moekit.routing import Router, Routing

# Calls of at most this many tokens without autograd (decoding) run only the chosen experts
# (`Experts.forward_selected`); larger ones sort their rows into all E groups (the dispatch).
SELECTED_MAX_TOKENS = 16


@dataclass
class MoEAux:
    """What one MoE layer call reports. Losses are float32 scalars.

    loss: the balance losses already multiplied by their coefficients (add it to the LM loss).
    balance_loss, z_loss, importance_loss, load_loss: each unweighted (0 when its coefficient is 0
        and it was not computed; see `computed`).
    counts: (E,) assignments each expert processed (after capacity).
    routed_counts: (E,) assignments the router sent to each expert (before capacity).
    dropped_fraction: share of the T*K assignments dropped by capacity.
    max_vio: max_i routed_i / mean routed - 1.  entropy: mean routing entropy (nats).
    ids, weights: (T, K) for token-choice routers (after capacity: -1 / 0 where dropped); None for
        expert choice.
    """

    loss: Tensor
    balance_loss: Tensor
    z_loss: Tensor
    importance_loss: Tensor
    load_loss: Tensor
    counts: Tensor
    routed_counts: Tensor
    dropped_fraction: Tensor
    max_vio: Tensor
    entropy: Tensor
    ids: Tensor | None
    weights: Tensor | None


class MoELayer(nn.Module):
    """A Mixture-of-Experts feed-forward layer.

    `y, aux = layer(x)` maps x (..., d_model) to y of the same shape. With a 3-D input (B, S, D) the
    B rows are the sequences that `aux_loss_scope="sequence"` balances separately.
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = SharedExperts(cfg) if cfg.n_shared_experts else None
        self.dispatcher = make_dispatcher(cfg)
        # Routed counts gathered since the last update_expert_bias() (aux-loss-free balancing).
        self.register_buffer("bias_counts", torch.zeros(cfg.n_experts), persistent=False)

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.bias_counts.zero_()

    def forward(
        self, x: Tensor, token_ids: Tensor | None = None, *, with_aux: bool = True
    ) -> tuple[Tensor, MoEAux | None]:
        """x (..., D) -> y (..., D), aux. token_ids (...): only for router="hash", which routes by
        them. with_aux=False skips the losses and metrics and returns None for aux (generation
        needs neither; on a decode step they cost about as much as the routing itself). It also
        skips counting the tokens for the aux-loss-free bias update: it is for inference."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoELayer expects inputs whose last dimension is d_model={self.cfg.d_model}, "
                f"got shape {tuple(x.shape)} (last dimension {x.shape[-1]})"
            )
        x_TD = x.reshape(-1, self.cfg.d_model)
        routing = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1))
        if self.selected_path(x_TD.shape[0]):
            y_TD = self.experts.forward_selected(x_TD, routing.ids_TK, routing.weights_TK)
            final_ids, final_w = routing.ids_TK, routing.weights_TK
            counts_E = losses.expert_counts(final_ids, self.cfg.n_experts) if with_aux else None
        else:
            x_RD, counts_E, state = self.dispatcher.dispatch(x_TD, routing)
            y_TD = self.dispatcher.combine(self.experts(x_RD, counts_E), state)
            final_ids, final_w = state.ids_TK, state.weights_TK
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if not with_aux:
            return y_TD.view(x.shape), None
        n_sequences = x.shape[0] if x.dim() == 3 else 1
        aux = self._aux(routing, counts_E, final_ids, final_w, n_sequences)
        return y_TD.view(x.shape), aux

    def selected_path(self, n_tokens: int) -> bool:
        """Whether a call of n_tokens runs only its chosen experts (the decode path): without
        autograd, at most SELECTED_MAX_TOKENS tokens, dropless dispatch, expert_impl "auto"."""
        return (
            n_tokens <= SELECTED_MAX_TOKENS
            and not torch.is_grad_enabled()
            and self.cfg.expert_impl == "auto"
            and type(self.dispatcher) is DroplessDispatcher
        )

    def _aux(
        self,
        routing: Routing,
        counts_E: Tensor,
        final_ids: Tensor | None,
        final_w: Tensor | None,
        n_seq: int,
    ) -> MoEAux:
        cfg = self.cfg
        zero = routing.logits_TE.new_zeros(())
        balance = z = importance = load = zero
        if cfg.token_choice:
            assert routing.ids_TK is not None
            routed_E = losses.expert_counts(routing.ids_TK, cfg.n_experts)
            if self.training and cfg.bias_update_rate > 0:
                self.bias_counts += routed_E.to(self.bias_counts.dtype)
        else:
            routed_E = counts_E
        if cfg.aux_loss_coef > 0:
            seqs = n_seq if cfg.aux_loss_scope == "sequence" else 1
            balance = losses.switch_balance_loss(routing.probs_TE, routing.ids_TK, seqs)
        if cfg.z_loss_coef > 0:
            z = losses.z_loss(routing.logits_TE)
        if cfg.importance_loss_coef > 0:
            importance = losses.importance_loss(routing.weights_TK, routing.ids_TK, cfg.n_experts)
        if cfg.load_loss_coef > 0 and routing.clean_logits_TE is not None:
            load = losses.load_loss(
                routing.clean_logits_TE, routing.logits_TE, routing.noise_std_TE, cfg.top_k
            )
        total = (
            cfg.aux_loss_coef * balance
            + cfg.z_loss_coef * z
            + cfg.importance_loss_coef * importance
            + cfg.load_loss_coef * load
        )
        assigned = routing.n_tokens * cfg.top_k
        with torch.no_grad():
            dropped = 1.0 - counts_E.sum().float() / max(assigned, 1)
            max_vio = losses.max_violation(routed_E)
            entropy = losses.routing_entropy(routing.probs_TE.detach())
        return MoEAux(
            loss=total,
            balance_loss=balance,
            z_loss=z,
            importance_loss=importance,
            load_loss=load,
            counts=counts_E,
            routed_counts=routed_E,
            dropped_fraction=dropped if cfg.token_choice else zero.detach(),
            max_vio=max_vio,
            entropy=entropy,
            ids=final_ids,
            weights=final_w,
        )

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step (Wang et al. 2024): b += rate * sign(mean load - load),
        from the routed counts gathered since the last call; then clears them."""
        rate = self.cfg.bias_update_rate
        if rate > 0 and self.bias_counts.sum() > 0:
            load = self.bias_counts
            self.router.expert_bias += rate * torch.sign(load.mean() - load)
        self.bias_counts.zero_()


def reference_expert(layer: MoELayer, e: int, x_D: Tensor) -> Tensor:
    """Expert e applied to one token, written from `expert_weights(e)` (nn.Linear layout)."""
    w_gate, w_up, w_down = layer.experts.expert_weights(e)
    w_in = w_up if w_gate is None else torch.cat([w_gate, w_up])
    h = w_in @ x_D
    if layer.experts.b_in is not None:
        h = h + layer.experts.b_in[e]
    cfg = layer.cfg
    y = w_down @ activate(h, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    if layer.experts.b_out is not None:
        y = y + layer.experts.b_out[e]
    return y


def reference_moe_forward(layer: MoELayer, x: Tensor, routing: Routing) -> Tensor:
    """Readable twin of `MoELayer.forward`: one token and one assignment at a time.

    Uses the given routing (the router has its own per-token twin) and the reference capacity
    assignment; returns y with x's shape. Slow; for tests.
    """
    cfg = layer.cfg
    x_TD = x.reshape(-1, cfg.d_model)
    T = x_TD.shape[0]
    contributions: list[list[Tensor]] = [[] for _ in range(T)]
    if cfg.router == "expert_choice":
        for e, (tokens, gates) in enumerate(zip(routing.tokens_EC, routing.gates_EC, strict=True)):
            for t, g in zip(tokens.tolist(), gates, strict=True):
                contributions[t].append(g * reference_expert(layer, e, x_TD[t]))
    else:
        final = routing.ids_TK.tolist()
        if cfg.capacity_factor is not None:
            final = reference_capacity_assignment(
                routing.ids_TK,
                routing.weights_TK,
                routing.selection_TE,
                token_capacity(T, cfg),
                cfg.drop_policy,
                cfg.overflow,
            )
        for t, experts in enumerate(final):
            for e in (e for e in experts if e >= 0):
                weight = routing.scores_TE[t, e] * routing.scale_T[t]
                contributions[t].append(weight * reference_expert(layer, e, x_TD[t]))
    rows = [sum(c) if c else x_TD.new_zeros(cfg.d_model) for c in contributions]
    y_TD = torch.stack([r.to(x.dtype) for r in rows])
    if layer.shared_experts is not None:
        y_TD = y_TD + layer.shared_experts(x_TD)
    return y_TD.view(x.shape)
