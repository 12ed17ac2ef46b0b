"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): a fixed map from token
id to expert, with no learned router.

The map is balanced over the vocabulary: each block of E consecutive token ids is rotated by an
offset hashed from the block's index, so every block sends exactly one id to each expert (each
expert owns V / E ids, to within one) while neighbouring ids land on unrelated experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.routing.base import Routing

_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (2^32 / golden ratio)


def hash_experts(token_ids_T: Tensor, n_experts: int, top_k: int = 1) -> Tensor:
    """(T,) token ids -> (T, K) long expert ids: the hashed expert, then the next K-1 (mod E)."""
    ids = token_ids_T.long()
    offset = ((ids // n_experts) * _MULTIPLIER % 2**32) // 2**16 % n_experts
    first = (ids + offset) % n_experts
    return (first[:, None] + torch.arange(top_k, device=ids.device)) % n_experts


def hash_route(token_ids_T: Tensor, cfg: MoEConfig, dtype: torch.dtype = torch.float32) -> Routing:
    """Route each token to its hashed experts with equal weights 1/K (the layer's output is the
    mean of the K experts). Logits are zero and scores uniform: there is nothing to learn or to
    balance, so the balance and z losses are constants without gradient."""
    T, E = token_ids_T.shape[0], cfg.n_experts
    ids_TK = hash_experts(token_ids_T, E, cfg.top_k)
    zeros_TE = torch.zeros(T, E, dtype=dtype, device=token_ids_T.device)
    uniform_TE = torch.full_like(zeros_TE, 1.0 / E)
    weights_TK = torch.full(ids_TK.shape, 1.0 / cfg.top_k, dtype=dtype, device=ids_TK.device)
    return Routing(
        logits_TE=zeros_TE, scores_TE=uniform_TE, probs_TE=uniform_TE, ids_TK=ids_TK,
        weights_TK=weights_TK, scale_T=torch.ones(T, dtype=dtype, device=ids_TK.device),
    )  # fmt: skip
