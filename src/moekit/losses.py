"""Balance losses and routing metrics, as pure functions of a routing decision.

Each loss is returned unweighted; `MoELayer` multiplies by the config's coefficients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(ids: Tensor, n_experts: int) -> Tensor:
    """(E,) long: how many entries of `ids` (any shape, -1 = none) name each expert."""
    flat = ids.reshape(-1)
    return torch.bincount(flat[flat >= 0], minlength=n_experts)


def switch_balance_loss(probs_TE: Tensor, ids_TK: Tensor, n_sequences: int = 1) -> Tensor:
    """Switch Transformer balance loss E * sum_i f_i * P_i (Fedus et al. 2021).

    f_i: share of the T*K assignments routed to expert i (no gradient); P_i: mean probability of
    expert i. Equals 1 under uniform routing. With n_sequences > 1 the T tokens are taken as
    n_sequences equal contiguous sequences, the loss is computed per sequence and averaged
    (DeepSeek-V3's sequence-wise balance loss).
    """
    T, E = probs_TE.shape
    K = ids_TK.shape[1]
    B = n_sequences
    ids_BR = ids_TK.reshape(B, (T // B) * K)
    counts_BE = probs_TE.new_zeros(B, E).scatter_add_(
        1, ids_BR, torch.ones_like(ids_BR, dtype=probs_TE.dtype)
    )
    f_BE = counts_BE / ids_BR.shape[1]
    P_BE = probs_TE.reshape(B, T // B, E).mean(1)
    return E * (f_BE * P_BE).sum(-1).mean()


def z_loss(logits_TE: Tensor) -> Tensor:
    """Router z-loss mean(logsumexp(logits)^2) (Zoph et al. 2022, ST-MoE)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(values_E: Tensor) -> Tensor:
    """Squared coefficient of variation var / mean^2 (population variance; 0 for one value)."""
    if values_E.numel() < 2:
        return values_E.new_zeros(())
    return values_E.var(correction=0) / (values_E.mean().square() + 1e-10)


def importance_loss(weights_TK: Tensor, ids_TK: Tensor, n_experts: int) -> Tensor:
    """Shazeer et al. 2017: CV^2 of each expert's importance, the sum of its gate values."""
    importance_E = weights_TK.new_zeros(n_experts).index_add(
        0, ids_TK.reshape(-1), weights_TK.reshape(-1)
    )
    return cv_squared(importance_E)


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


def load_loss(
    clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor, k: int
) -> Tensor:
    """Shazeer et al. 2017: CV^2 of each expert's smooth load, sum_t P(t, i)."""
    return cv_squared(load_probabilities(clean_logits_TE, noisy_logits_TE, noise_std_TE, k).sum(0))


def max_violation(counts_E: Tensor) -> Tensor:
    """MaxVio = max_i load_i / mean load - 1 (Wang et al. 2024); 0 when perfectly balanced."""
    counts = counts_E.float()
    return counts.max() / counts.mean().clamp(min=1e-9) - 1.0


def routing_entropy(probs_TE: Tensor) -> Tensor:
    """Mean over tokens of the entropy (nats) of the routing distribution; log E when uniform."""
    return -(probs_TE * torch.log(probs_TE.clamp(min=1e-30))).sum(-1).mean()
