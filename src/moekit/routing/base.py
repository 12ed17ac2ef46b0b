"""What a router returns: the `Routing` record shared by every router and dispatcher, and the
expert capacity that expert choice and capacity dispatch both read."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from moekit.config import MoEConfig


def expert_capacity(n_tokens: int, cfg: MoEConfig) -> int:
    """C = ceil(capacity_factor * T * top_k / E) of a call's T tokens, never more than T (a token
    uses an expert once); at least 1 when there are tokens (capacity_factor > 0)."""
    assert cfg.capacity_factor is not None
    return min(n_tokens, math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_experts))


@dataclass
class Routing:
    """The routing decision for T tokens over E experts (all float fields are float32).

    Token choice fills `ids_TK` / `weights_TK`; expert choice fills `tokens_EC` / `gates_EC`.

    ids_TK: (T, K) long, the experts each token chose, best first.
    weights_TK: (T, K) combine weights, `scores_TE.gather(1, ids_TK) * scale_T[:, None]`.
    logits_TE: (T, E) router logits (noisy ones when gaussian noise is on).
    scores_TE: (T, E) scores the weights are read from (softmax or sigmoid of the logits).
    probs_TE: (T, E) the scores as a distribution over experts (sigmoid scores renormalised), used
        by the balance loss and the routing entropy.
    selection_TE: (T, E) what the top-k ranked: biased scores, -inf outside the allowed groups.
    scale_T: (T,) per-token factor from scores to weights (routed_scaling / normaliser).
    clean_logits_TE, noise_std_TE: (T, E) the noise-free logits and the learned noise std
        (gaussian noise only; the load loss needs them).
    tokens_EC, gates_EC: (E, C) the tokens each expert took and their weights (expert choice).
    """

    logits_TE: Tensor
    scores_TE: Tensor
    probs_TE: Tensor
    ids_TK: Tensor | None = None
    weights_TK: Tensor | None = None
    selection_TE: Tensor | None = None
    scale_T: Tensor | None = None
    clean_logits_TE: Tensor | None = None
    noise_std_TE: Tensor | None = None
    tokens_EC: Tensor | None = None
    gates_EC: Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.logits_TE.shape[0]

    @property
    def n_experts(self) -> int:
        return self.logits_TE.shape[1]
