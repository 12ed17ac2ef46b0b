"""Balance losses and routing metrics, as pure functions of a routing decision or of its sums
over tokens (which add up over processes: `MoELayer` reduces them before deriving its `aux`).

Each loss is returned unweighted; `MoELayer` multiplies by the config's coefficients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype sums of counts, losses and figures are kept in: float64 (counts stay exact,
    many small terms keep their digits), except on devices without it (Apple's MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def expert_counts(ids: Tensor, n_experts: int) -> Tensor:
    """(E,) long: how many entries of `ids` (any shape, -1 = none) name each expert. Counted by a
    scatter into E + 1 slots (slot 0 takes the -1s): no host sync, where masking out the -1s or
    `torch.bincount` on a GPU would each wait for the device."""
    flat = ids.reshape(-1) + 1
    counts = flat.new_zeros(n_experts + 1).scatter_add_(0, flat, torch.ones_like(flat))
    return counts[1:]


def switch_balance(counts_E: Tensor, probs_E: Tensor, n_tokens: Tensor | int, top_k: int) -> Tensor:
    """Switch Transformer balance loss E * sum_i f_i * P_i (Fedus et al. 2021) from sums over
    n_tokens tokens: counts_E (..., E) assignments routed to each expert, probs_E (..., E) each
    expert's summed router probability. f_i = counts_i / (n_tokens * top_k) carries no gradient;
    P_i = probs_i / n_tokens. Returns (...); 1 under uniform routing."""
    f_E = counts_E / (n_tokens * top_k)
    return counts_E.shape[-1] * (f_E * (probs_E / n_tokens)).sum(-1)


def switch_balance_loss(probs_TE: Tensor, ids_TK: Tensor, n_sequences: int = 1) -> Tensor:
    """`switch_balance` of probs_TE (T, E) and ids_TK (T, K). With n_sequences > 1 the T tokens
    are taken as n_sequences equal contiguous sequences, the loss is computed per sequence and
    averaged (DeepSeek-V3's sequence-wise balance loss).
    """
    T, E = probs_TE.shape
    B = n_sequences
    ids_BR = ids_TK.reshape(B, -1)
    counts_BE = probs_TE.new_zeros(B, E).scatter_add_(
        1, ids_BR, torch.ones_like(ids_BR, dtype=probs_TE.dtype)
    )
    probs_BE = probs_TE.reshape(B, T // B, E).sum(1)
    return switch_balance(counts_BE, probs_BE, T // B, ids_TK.shape[1]).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(values_E: Tensor) -> Tensor:
    """Squared coefficient of variation var / mean^2 (population variance; 0 for one value)."""
    if values_E.numel() < 2:
        return values_E.new_zeros(())
    return values_E.var(correction=0) / (values_E.mean().square() + 1e-10)


def expert_importance(weights_TK: Tensor, ids_TK: Tensor, n_experts: int) -> Tensor:
    """(E,) each expert's importance (Shazeer et al. 2017): the sum of its gate values."""
    return weights_TK.new_zeros(n_experts).index_add(0, ids_TK.reshape(-1), weights_TK.reshape(-1))


def load_probabilities(
    clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor, k: int
) -> Tensor:
    """Shazeer et al. 2017 (appendix A) smooth load estimator, (T, E).

    P(t, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / std_i): the probability that expert i
    is in token t's top-k under a fresh draw of its own noise, the other logits held. Needs k < E.
    """
    top_TK1 = noisy_logits_TE.topk(k + 1, dim=-1).values
    threshold_if_in = top_TK1[:, k : k + 1]
    threshold_if_out = top_TK1[:, k - 1 : k]
    is_in = noisy_logits_TE >= threshold_if_out
    threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
    return torch.special.ndtr((clean_logits_TE - threshold) / noise_std_TE)


def max_violation(load_E: Tensor) -> Tensor:
    """MaxVio = max_i load_i / mean load - 1 (Wang et al. 2024) of counts or shares (integer
    counts are taken as float32); 0 when perfectly balanced."""
    load = load_E if load_E.is_floating_point() else load_E.float()
    return load.max() / load.mean().clamp(min=1e-12) - 1.0


def entropy(p: Tensor) -> Tensor:
    """Entropy (nats) of each distribution p (..., E) over its last axis; log E when uniform."""
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)
