"""`MoELayer` = router + dispatch + experts (+ shared experts), returning its output and `aux`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch import DroplessDispatcher, make_dispatcher
from moekit.dispatch.reference import reference_capacity_assignment
from moekit.experts import Experts, SharedExperts, activate
from moekit.routing import Router, Routing, expert_capacity

# Decoding calls (a KV cache is present) of at most this many tokens run only the chosen experts
# (`Experts.forward_selected`); larger ones sort their rows into all E groups (the dispatch).
SELECTED_MAX_TOKENS = 16

# The losses `aux.loss` weights, and the config field of each one's coefficient.
LOSS_COEFFICIENTS = {
    "balance_loss": "aux_loss_coef",
    "z_loss": "z_loss_coef",
    "importance_loss": "importance_loss_coef",
    "load_loss": "load_loss_coef",
}


def own_batch(sums: Tensor) -> Tensor:
    """The default reduction of a layer's statistics: its batch is its own call's tokens."""
    return sums


@dataclass
class MoEAux:
    """What one MoE layer call reports. Losses are float32 scalars. Losses and metrics are those
    of the batch `MoELayer.reduce_stats` defines: the call's tokens, or under expert parallelism
    with scope="global" those of every process.

    loss: the balance losses already multiplied by their coefficients (add it to the LM loss).
    balance_loss, z_loss, importance_loss, load_loss: each unweighted (0 when its coefficient is 0:
        not computed).
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
        # How this call's statistics (`balance_sums`, as one float64 vector) become those of the
        # batch that `aux` describes, and the gathered routed counts those the biases move by:
        # this layer's own by default; expert parallelism sets sums over processes from outside.
        self.reduce_stats: Callable[[Tensor], Tensor] = own_batch
        self.reduce_bias_counts: Callable[[Tensor], Tensor] = own_batch

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.bias_counts.zero_()

    def forward(
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        *,
        with_aux: bool = True,
        decoding: bool = False,
    ) -> tuple[Tensor, MoEAux | None]:
        """x (..., D) -> y (..., D), aux. token_ids (...): only for router="hash", which routes by
        them. with_aux=False skips the losses and metrics and returns None for aux (generation
        needs neither; on a decode step they cost about as much as the routing itself). It also
        skips counting the tokens for the aux-loss-free bias update: it is for inference.
        decoding: the call continues sequences from a KV cache (the model passes it when given
        one): a few tokens then run only their chosen experts (`selected_path`)."""
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoELayer expects inputs whose last dimension is d_model={self.cfg.d_model}, "
                f"got shape {tuple(x.shape)} (last dimension {x.shape[-1]})"
            )
        x_TD = x.reshape(-1, self.cfg.d_model)
        routing = self.router(x_TD, None if token_ids is None else token_ids.reshape(-1))
        if self.selected_path(x_TD.shape[0], decoding):
            y_TD = self.experts.forward_selected(x_TD, routing.ids_TK, routing.weights_TK)
            final_ids, final_w = routing.ids_TK, routing.weights_TK
            counts_E = None  # `_aux` counts the kept assignments from final_ids
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

    def selected_path(self, n_tokens: int, decoding: bool) -> bool:
        """Whether a call of n_tokens runs only its chosen experts (the decode path): a decoding
        call of at most SELECTED_MAX_TOKENS tokens, dropless dispatch, expert_impl "auto"."""
        return (
            decoding
            and n_tokens <= SELECTED_MAX_TOKENS
            and self.cfg.expert_impl == "auto"
            and type(self.dispatcher) is DroplessDispatcher
        )

    def _aux(
        self,
        routing: Routing,
        counts_E: Tensor | None,
        final_ids: Tensor | None,
        final_w: Tensor | None,
        n_seq: int,
    ) -> MoEAux:
        cfg = self.cfg
        own = balance_sums(routing, counts_E, final_ids, n_seq, cfg)
        if self.training and cfg.bias_update_rate > 0:
            self.bias_counts += own["routed_E"].to(self.bias_counts.dtype)
        sums = reduce_sums(own, self.reduce_stats)
        zero = routing.logits_TE.new_zeros(())
        found = {name: loss.to(zero.dtype) for name, loss in balance_losses(sums, cfg).items()}
        weighted = [getattr(cfg, LOSS_COEFFICIENTS[name]) * loss for name, loss in found.items()]
        T = sums["tokens_sequences"][0]
        routed_E = sums["routed_E"].long()  # float64 sums of counts are exact integers
        dropped = 1.0 - sums["kept_E"].sum() / (T * cfg.top_k).clamp(min=1)
        return MoEAux(
            loss=sum(weighted, zero),
            **{name: found.get(name, zero) for name in LOSS_COEFFICIENTS},
            counts=sums["kept_E"].long(),
            routed_counts=routed_E,
            dropped_fraction=dropped.to(zero.dtype) if cfg.token_choice else zero.detach(),
            max_vio=losses.max_violation(routed_E),
            entropy=(sums["entropy"] / T).to(zero.dtype),
            ids=final_ids,
            weights=final_w,
        )

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step (Wang et al. 2024): b += rate * sign(mean load - load),
        from the routed counts gathered since the last call; then clears them. A frozen router
        (none of its parameters needs a gradient: `train.freeze`) keeps its bias: the bias is
        part of the routing it was frozen with."""
        rate = self.cfg.bias_update_rate
        frozen = not any(p.requires_grad for p in self.router.parameters())
        if rate > 0 and not frozen:  # no tokens counted: every sign 0, nothing moves (no sync)
            load = self.reduce_bias_counts(self.bias_counts)
            self.router.expert_bias += rate * torch.sign(load.mean() - load)
        self.bias_counts.zero_()


def balance_sums(
    routing: Routing,
    counts_E: Tensor | None,
    final_ids: Tensor | None,
    n_seq: int,
    cfg: MoEConfig,
) -> dict[str, Tensor]:
    """The sufficient statistics of one call's balance losses and metrics: sums over its tokens,
    which add up over processes to those of their whole batch (gradients kept where a loss needs
    them). counts_E: the dispatcher's counts (expert choice reads them); final_ids (T, K): the
    experts each assignment ended on after capacity (-1 where dropped; None for expert choice).

    tokens_sequences (2,): T and the number of sequences. routed_E, kept_E (E,): assignments per
    expert before and after capacity. entropy: summed routing entropy. Where its coefficient is
    set: probs_E (E,) summed router probabilities or seq_balance (sum of the per-sequence balance
    losses, aux_loss_scope="sequence"); z: summed z-loss; importance_E, load_E (E,).
    """
    T, probs_TE, ids_TK = routing.n_tokens, routing.probs_TE, routing.ids_TK
    routed_E = counts_E if ids_TK is None else losses.expert_counts(ids_TK, cfg.n_experts)
    # Counted over all E experts, not read from the dispatcher: an expert-parallel one counts
    # only this process's experts. Dispatchers that keep every assignment pass ids_TK on.
    kept_E = routed_E if final_ids is ids_TK else losses.expert_counts(final_ids, cfg.n_experts)
    sums = {
        "tokens_sequences": _pair(probs_TE, T, n_seq),
        "routed_E": routed_E,
        "kept_E": kept_E,
        "entropy": losses.entropy(probs_TE.detach()).sum(),
    }
    if cfg.aux_loss_coef > 0 and cfg.aux_loss_scope == "sequence":
        sums["seq_balance"] = n_seq * losses.switch_balance_loss(probs_TE, ids_TK, n_seq)
    elif cfg.aux_loss_coef > 0:
        sums["probs_E"] = probs_TE.sum(0)
    if cfg.z_loss_coef > 0:
        sums["z"] = T * losses.z_loss(routing.logits_TE)
    if cfg.importance_loss_coef > 0:
        sums["importance_E"] = losses.expert_importance(routing.weights_TK, ids_TK, cfg.n_experts)
    if cfg.load_loss_coef > 0 and routing.clean_logits_TE is not None:
        sums["load_E"] = losses.load_probabilities(
            routing.clean_logits_TE, routing.logits_TE, routing.noise_std_TE, cfg.top_k
        ).sum(0)
    return sums


def _pair(like: Tensor, a: float, b: float) -> Tensor:
    """(a, b) on `like`'s device, written by fills: a tensor made from a list would be a blocking
    copy from the host on a GPU."""
    pair = like.new_full((2,), a, dtype=losses.sum_dtype(like.device))
    pair[1] = b
    return pair


def reduce_sums(sums: dict[str, Tensor], reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """`sums` in `losses.sum_dtype`, passed through `reduce` as one vector (one collective per
    call when it is a sum over processes; no vector to build for the default `own_batch`)."""
    parts = {name: s.to(losses.sum_dtype(s.device)) for name, s in sums.items()}
    if reduce is own_batch:
        return parts
    flat = reduce(torch.cat([p.reshape(-1) for p in parts.values()]))
    pieces = flat.split([p.numel() for p in parts.values()])
    return {name: x.view_as(p) for (name, p), x in zip(parts.items(), pieces, strict=True)}


def balance_losses(sums: dict[str, Tensor], cfg: MoEConfig) -> dict[str, Tensor]:
    """The unweighted losses whose sums `sums` holds (`balance_sums`), by `MoEAux` field."""
    T, B = sums["tokens_sequences"][0], sums["tokens_sequences"][1]
    found = {}
    if "seq_balance" in sums:
        found["balance_loss"] = sums["seq_balance"] / B
    elif "probs_E" in sums:
        found["balance_loss"] = losses.switch_balance(
            sums["routed_E"], sums["probs_E"], T, cfg.top_k
        )
    if "z" in sums:
        found["z_loss"] = sums["z"] / T
    if "importance_E" in sums:
        found["importance_loss"] = losses.cv_squared(sums["importance_E"])
    if "load_E" in sums:
        found["load_loss"] = losses.cv_squared(sums["load_E"])
    return found


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
                expert_capacity(T, cfg),
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
