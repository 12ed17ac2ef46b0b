"""The `Router` module: holds the routing parameters and turns tokens into a `Routing`."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.config import MoEConfig
from moekit.routing.base import Routing
from moekit.routing.expert_choice import expert_choice_route
from moekit.routing.hash import hash_route
from moekit.routing.topk import topk_route


class Router(nn.Module):
    """Linear router `logits = x @ weight.T` computed in float32 (float64 stays float64, for
    gradcheck), then the configured scheme.

    weight: (E, D) parameter. bias: (E,) parameter added to the logits (`router_bias`, GPT-OSS)
    or None. expert_bias: (E,) buffer, the aux-loss-free selection correction
    (selection only, never in the weights; moved by `MoELayer.update_expert_bias`).
    noise_weight: (E, D) parameter for gaussian noisy top-k (Shazeer et al. 2017).
    """

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.bias = nn.Parameter(torch.empty(cfg.n_experts)) if cfg.router_bias else None
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        # The logits' product; moekit.inference.decode_kernels swaps in its own for generation.
        self.linear: Callable[..., Tensor] = F.linear
        self.noise_weight = None
        if cfg.noise == "gaussian":
            self.noise_weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model))
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.expert_bias.zero_()
        if self.noise_weight is not None:
            # Zero noise weights start the learned std at softplus(0) = 0.69 (as Shazeer 2017).
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: Tensor, token_ids_T: Tensor | None = None) -> Routing:
        """x_TD: (T, D) any float dtype -> Routing with float32 (or float64) logits (T, E).
        token_ids_T (T,): the token ids, needed (and only used) by router="hash"."""
        x = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        if self.cfg.router == "hash":
            if token_ids_T is None or token_ids_T.shape[0] != x_TD.shape[0]:
                raise ValueError(
                    "router='hash' routes by token id: call the layer as layer(x, ids)"
                )
            return hash_route(token_ids_T, self.cfg, x.dtype)
        if self.cfg.noise == "jitter" and self.training:
            eps = self.cfg.noise_eps
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        logits_TE = self.linear(x, self.weight.to(x.dtype), bias)
        if self.cfg.router == "expert_choice":
            return expert_choice_route(logits_TE, self.cfg)
        if self.noise_weight is None or not self.training:
            return topk_route(logits_TE, self.expert_bias, self.cfg)
        noise_std_TE = F.softplus(F.linear(x, self.noise_weight.to(x.dtype)))
        noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        routing = topk_route(noisy_TE, self.expert_bias, self.cfg)
        routing.clean_logits_TE = logits_TE
        routing.noise_std_TE = noise_std_TE
        return routing

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.router}, score={c.score}, experts={c.n_experts}, top_k={c.top_k}"
