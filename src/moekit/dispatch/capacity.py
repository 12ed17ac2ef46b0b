"""Capacity dispatch (GShard, Switch): each expert computes at most C assignments per call.

C = ceil(capacity_factor * T * K / E) (`moekit.routing.expert_capacity`). Which assignments win a
full expert is the drop policy: "position" (every first choice before any second choice, then
token order) or "probability" (highest routing weight first, batch-prioritised routing). An
overflowing assignment is dropped (contributes zero, the token's other weights unchanged) or, with
overflow="next_best", moved to the token's best remaining expert that has room.
`dispatch/reference.py` is the readable twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit import losses
from moekit.config import MoEConfig
from moekit.dispatch.base import DispatchState, combine_rows, sort_by_expert
from moekit.dispatch.combine import gather_rows
from moekit.routing.base import Routing, expert_capacity


def priority_order(weights_TK: Tensor, policy: str) -> Tensor:
    """Flat assignment indices (t * K + k), highest priority first. weights_TK: (T, K)."""
    T, K = weights_TK.shape
    if policy == "position":
        by_choice_then_token = torch.arange(T, device=weights_TK.device) * K
        return (
            by_choice_then_token.unsqueeze(0) + torch.arange(K, device=weights_TK.device)[:, None]
        ).reshape(-1)
    return torch.argsort(weights_TK.detach().reshape(-1), descending=True, stable=True)


def rank_within_expert(ids_P: Tensor, n_experts: int) -> Tensor:
    """For assignments listed in priority order (ids_P: (P,) expert ids), each one's 0-based
    position among the assignments of the same expert."""
    order_P, counts_E = sort_by_expert(ids_P, n_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    ranks_sorted = torch.arange(ids_P.numel(), device=ids_P.device) - starts_E[ids_P[order_P]]
    return torch.empty_like(ranks_sorted).scatter_(0, order_P, ranks_sorted)


def first_of_each_token(tokens_H: Tensor) -> Tensor:
    """(H,) bool: True at the first occurrence of each token in the list."""
    order = torch.argsort(tokens_H, stable=True)
    sorted_tokens = tokens_H[order]
    first_sorted = torch.ones_like(sorted_tokens, dtype=torch.bool)
    first_sorted[1:] = sorted_tokens[1:] != sorted_tokens[:-1]
    return torch.empty_like(first_sorted).scatter_(0, order, first_sorted)


def reroute_overflow(
    final_ids: Tensor, prio_R: Tensor, selection_TE: Tensor, room_E: Tensor, K: int
) -> None:
    """Move dropped assignments (final_ids == -1, flat (T*K,)) to next-best experts, in place.

    In rounds: each token with homeless assignments sends its highest-priority one to its best
    remaining expert (by selection score, after its top-k) that had room at the round's start;
    experts accept proposals by priority up to their free room. Tokens with no candidate left
    keep their assignments dropped.
    """
    candidates_TE = selection_TE.argsort(dim=-1, descending=True)
    allowed_TE = torch.isfinite(selection_TE.gather(1, candidates_TE))
    position_E = torch.arange(selection_TE.shape[1], device=final_ids.device)
    next_T = torch.full((selection_TE.shape[0],), K, device=final_ids.device)
    homeless = prio_R[final_ids[prio_R] < 0]
    while homeless.numel():
        proposer = homeless[first_of_each_token(homeless // K)]
        tok = proposer // K
        open_TE = allowed_TE[tok] & (room_E[candidates_TE[tok]] > 0)
        open_TE &= position_E >= next_T[tok].unsqueeze(1)
        has_room = open_TE.any(-1)
        pick = open_TE.int().argmax(-1)
        next_T[tok] = pick + 1
        expert = candidates_TE[tok, pick]
        accepted = has_room & (rank_within_expert(expert, room_E.numel()) < room_E[expert])
        final_ids[proposer[accepted]] = expert[accepted]
        room_E -= losses.expert_counts(expert.where(accepted, -1), room_E.numel())
        exhausted = torch.zeros_like(next_T, dtype=torch.bool)
        exhausted[tok[~has_room]] = True
        homeless = homeless[(final_ids[homeless] < 0) & ~exhausted[homeless // K]]


def capacity_assignment(routing: Routing, capacity: int, policy: str, overflow: str) -> Tensor:
    """The expert each assignment ends on after capacity: (T, K) long, -1 where dropped."""
    assert routing.ids_TK is not None and routing.weights_TK is not None
    ids_flat = routing.ids_TK.reshape(-1)
    prio_R = priority_order(routing.weights_TK, policy)
    kept_in_prio = rank_within_expert(ids_flat[prio_R], routing.n_experts) < capacity
    final_ids = torch.full_like(ids_flat, -1)
    final_ids[prio_R[kept_in_prio]] = ids_flat[prio_R[kept_in_prio]]
    if overflow == "next_best" and not bool(kept_in_prio.all()):
        kept_counts = losses.expert_counts(final_ids, routing.n_experts)
        assert routing.selection_TE is not None
        reroute_overflow(
            final_ids, prio_R, routing.selection_TE, capacity - kept_counts, routing.ids_TK.shape[1]
        )
    return final_ids.view_as(routing.ids_TK)


class CapacityDispatcher:
    """Token-choice dispatch with a per-expert capacity."""

    def __init__(self, cfg: MoEConfig) -> None:
        self.cfg = cfg

    def dispatch(self, x_TD: Tensor, routing: Routing) -> tuple[Tensor, Tensor, DispatchState]:
        assert routing.scores_TE is not None and routing.scale_T is not None
        T = x_TD.shape[0]
        final_TK = self.assignment(routing)
        kept_TK = final_TK >= 0
        # Weights are re-read from the scores so that moved assignments get their new expert's score
        # under the token's original normaliser; dropped assignments weigh zero.
        gathered_TK = routing.scores_TE.gather(1, final_TK.clamp(min=0)) * routing.scale_T[:, None]
        weights_TK = torch.where(kept_TK, gathered_TK, torch.zeros_like(gathered_TK))
        slots = kept_TK.reshape(-1).nonzero().squeeze(1)
        order_R, counts_E = sort_by_expert(final_TK.reshape(-1)[slots], routing.n_experts)
        slot_R = slots[order_R]
        token_R = slot_R // final_TK.shape[1]
        state = DispatchState(token_R, weights_TK.reshape(-1)[slot_R], final_TK, weights_TK, T)
        return gather_rows(x_TD, token_R), counts_E, state

    def combine(self, y_RD: Tensor, state: DispatchState) -> Tensor:
        return combine_rows(y_RD, state)

    def assignment(self, routing: Routing) -> Tensor:
        """(T, K) the expert each assignment ends on, -1 where dropped, with the capacity of this
        call's T tokens. (Expert parallelism overrides it to decide over the global batch.)"""
        capacity = expert_capacity(routing.n_tokens, self.cfg)
        return capacity_assignment(routing, capacity, self.cfg.drop_policy, self.cfg.overflow)
