"""Routing statistics as pure functions over a routing trace of one layer.

A trace is `ids_TK` (T tokens, K experts each, -1 where capacity dropped an assignment) plus, where
a metric needs them, per-token labels. Every function counts only the assignments that were kept.
A load's MaxVio and entropy are those of training: `moekit.losses.max_violation` and `entropy`.
"""

from __future__ import annotations

from math import comb

import torch
from torch import Tensor

from moekit import losses

DEAD_FRACTION = 0.1  # an expert whose load is below 10% of the mean load is "dead"


def routed_mask(ids_TK: Tensor, n_experts: int) -> Tensor:
    """(T, E) bool: True where token t was routed to expert e (dropped assignments ignored)."""
    mask = torch.zeros(ids_TK.shape[0], n_experts + 1, dtype=torch.bool)
    mask.scatter_(1, torch.where(ids_TK < 0, n_experts, ids_TK).long(), True)
    return mask[:, :n_experts]


def expert_load(ids_TK: Tensor, n_experts: int) -> Tensor:
    """(E,) float: assignments per expert, as a share of all kept assignments (sums to 1)."""
    counts = losses.expert_counts(ids_TK.long(), n_experts).double()
    return counts / counts.sum().clamp(min=1)


def dead_experts(load_E: Tensor) -> list[int]:
    """Experts whose load is below DEAD_FRACTION of the mean load."""
    return torch.nonzero(load_E < DEAD_FRACTION * load_E.mean()).flatten().tolist()


def repetition(ids_TK: Tensor, new_seq_T: Tensor) -> dict[str, float]:
    """Consecutive-token repetition (Mixtral paper, Table 5) over pairs (t-1, t) in one sequence.

    first: share of pairs whose first choice is the same expert. any: share of pairs whose top-k
    sets share at least one expert. new_seq_T (T,) bool marks the first token of each sequence.
    """
    keep = ~new_seq_T[1:]
    prev, cur = ids_TK[:-1][keep], ids_TK[1:][keep]
    if prev.shape[0] == 0:
        return {"first": float("nan"), "any": float("nan")}
    first = (prev[:, 0] == cur[:, 0]) & (cur[:, 0] >= 0)
    shared = (prev[:, :, None] == cur[:, None, :]) & (cur[:, None, :] >= 0)
    return {"first": float(first.double().mean()), "any": float(shared.any((1, 2)).double().mean())}


def repetition_baselines(n_experts: int, top_k: int, first_load_E: Tensor) -> dict[str, float]:
    """The rates `repetition` would give if consecutive tokens were routed independently.

    first_uniform: 1/E, first choices uniform (the Mixtral paper's baseline, 12.5% for E=8).
    first_load_weighted: sum_i p_i^2 with p the measured first-choice load: independent tokens at
    the measured load. any_uniform: 1 - C(E-K, K) / C(E, K), two uniform random K-subsets
    intersect (46% for E=8, K=2, the paper's "first or second choice" baseline).
    """
    p = first_load_E / first_load_E.sum().clamp(min=1e-12)
    return {
        "first_uniform": 1.0 / n_experts,
        "first_load_weighted": float((p * p).sum()),
        "any_uniform": 1.0 - comb(n_experts - top_k, top_k) / comb(n_experts, top_k),
    }


def coactivation(ids_TK: Tensor, n_experts: int) -> Tensor:
    """(E, E): entry (i, j) is the share of tokens routed to i that are also routed to j (OLMoE).

    Not symmetric. The diagonal is 0 (a token's co-activation with itself is not a pair); rows of
    experts that received no token are 0.
    """
    mask = routed_mask(ids_TK, n_experts).double()
    both = mask.T @ mask
    out = both / mask.sum(0).clamp(min=1)[:, None]
    return out.fill_diagonal_(0.0)


def specialisation(ids_TK: Tensor, labels_T: Tensor, n_classes: int, n_experts: int) -> Tensor:
    """(E, C): share of the tokens of class c that are routed to expert e (OLMoE's domain
    specialisation). Uniform routing gives K/E everywhere; columns of empty classes are 0."""
    mask = routed_mask(ids_TK, n_experts).double()
    onehot = torch.nn.functional.one_hot(labels_T.long(), n_classes).double()
    per_class = onehot.sum(0).clamp(min=1)
    return (mask.T @ onehot) / per_class[None, :]


def vocabulary_specialisation(
    token_ids_T: Tensor, ids_TK: Tensor, n_experts: int, min_count: int = 1
) -> dict[str, Tensor]:
    """OLMoE's vocabulary specialisation: how exclusively each token id goes to one expert.

    share (V, E): for token id x, the share of its occurrences routed to expert e (uniform: K/E),
    over token ids seen at least `min_count` times (`token_ids` (V,)). per_expert (E,): the mean of
    share[x, e] over the routings expert e received, i.e. sum_x n_xe^2 / n_x / sum_x n_xe; 1 when
    every token id the expert sees always goes to it, K/E under uniform routing.
    """
    mask = routed_mask(ids_TK, n_experts).double()
    uniq, inverse, n_x = torch.unique(token_ids_T, return_inverse=True, return_counts=True)
    n_xe = torch.zeros(uniq.shape[0], n_experts, dtype=torch.float64).index_add_(0, inverse, mask)
    share = n_xe / n_x[:, None].double()
    keep = n_x >= min_count
    n_xe, share = n_xe[keep], share[keep]
    per_expert = (n_xe * share).sum(0) / n_xe.sum(0).clamp(min=1)
    return {"token_ids": uniq[keep], "share": share, "per_expert": per_expert}


def saturation(ids_TK: Tensor, final_ids_TK: Tensor) -> float:
    """OLMoE's router saturation: the mean share of a token's top-k at a checkpoint that is also
    in its top-k at the final checkpoint (1 when they agree; K/E expected by chance)."""
    same = (ids_TK[:, :, None] == final_ids_TK[:, None, :]) & (ids_TK[:, :, None] >= 0)
    return float(same.any(2).double().sum(1).mean() / ids_TK.shape[1])
