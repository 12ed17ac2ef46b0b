"""Token-choice top-k routing: softmax (Switch, Mixtral) and sigmoid (DeepSeek-V3), with optional
group-limited selection (DeepSeek-V3) and the aux-loss-free selection bias (Wang et al. 2024)."""

from __future__ import annotations

import torch
from torch import Tensor

from moekit import moe_kernels
from moekit.config import MoEConfig
from moekit.routing.base import Routing

# Keeps the normaliser finite when every selected sigmoid score underflows (as DeepSeek-V3 does).
NORMALIZER_EPS = 1e-20


def score(logits_TE: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Scores and their distribution over experts: (scores_TE, probs_TE), both (T, E)."""
    if kind == "softmax":
        scores = torch.softmax(logits_TE, dim=-1)
        return scores, scores
    scores = torch.sigmoid(logits_TE)
    return scores, scores / (scores.sum(-1, keepdim=True) + NORMALIZER_EPS)


def group_limit(selection_TE: Tensor, n_groups: int, topk_groups: int) -> Tensor:
    """Mask (to -inf) the experts outside each token's best `topk_groups` groups.

    A group's score is the sum of its two best selection scores (DeepSeek-V3; the best one alone
    when a group has a single expert). selection_TE: (T, E) -> (T, E).
    """
    if n_groups == 1 or topk_groups == n_groups:
        return selection_TE
    T, E = selection_TE.shape
    grouped = selection_TE.view(T, n_groups, E // n_groups)
    group_score_TG = grouped.topk(min(2, E // n_groups), dim=-1).values.sum(-1)
    best_groups = group_score_TG.topk(topk_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_groups, True)
    return grouped.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, E)


def topk_route(logits_TE: Tensor, expert_bias_E: Tensor, cfg: MoEConfig) -> Routing:
    """Route each token to its top-k experts. logits_TE: (T, E) float32.

    Selection ranks `scores + expert_bias` (restricted to the allowed groups); the weights are the
    unbiased scores at the selected experts, renormalised when `cfg.normalize`, times
    `cfg.routed_scaling`. The bias never reaches the weights.
    """
    scores_TE, probs_TE = score(logits_TE, cfg.score)
    selection_TE = group_limit(scores_TE.detach() + expert_bias_E, cfg.n_groups, cfg.topk_groups)
    ids_TK = moe_kernels.topk_ids(selection_TE, cfg.top_k)
    selected_TK = scores_TE.gather(1, ids_TK)
    if cfg.normalize:  # reciprocal() * scaling is what `scaling / tensor` runs, minus a wrapper
        scale_T = (selected_TK.sum(-1) + NORMALIZER_EPS).reciprocal() * cfg.routed_scaling
    else:
        scale_T = torch.full_like(selected_TK[:, 0], cfg.routed_scaling)
    return Routing(
        logits_TE=logits_TE,
        scores_TE=scores_TE,
        probs_TE=probs_TE,
        ids_TK=ids_TK,
        weights_TK=selected_TK * scale_T.unsqueeze(-1),
        selection_TE=selection_TE,
        scale_T=scale_T,
    )
