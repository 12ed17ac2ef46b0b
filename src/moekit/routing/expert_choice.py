"""Expert-choice routing (Zhou et al. 2022): each expert takes its C best tokens.

Not causal: whether a token is taken depends on every other token of the call, including later
ones, so it cannot be used for autoregressive decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.config import MoEConfig
from moekit.routing.base import Routing, expert_capacity


def expert_choice_route(logits_TE: Tensor, cfg: MoEConfig) -> Routing:
    """s = softmax(logits) over experts; expert e takes the C tokens with the highest s[:, e].

    Returns tokens_EC (E, C) and gates_EC = s[tokens_EC, e] (E, C).
    """
    scores_TE = torch.softmax(logits_TE, dim=-1)
    capacity = expert_capacity(logits_TE.shape[0], cfg)
    gates_EC, tokens_EC = scores_TE.t().topk(capacity, dim=-1)
    return Routing(
        logits_TE=logits_TE,
        scores_TE=scores_TE,
        probs_TE=scores_TE,
        tokens_EC=tokens_EC,
        gates_EC=gates_EC,
    )
