"""Tiny MoE layers for tests, built so that top-k selection has no near-ties."""

from __future__ import annotations

import torch

from moekit import MoEConfig, MoELayer

BASE = dict(d_model=12, d_expert=10, n_experts=8, top_k=2)

# Each router x option combination the tests cover (name, MoEConfig overrides).
CASES: dict[str, dict] = {
    "switch": dict(top_k=1, normalize=False),
    "mixtral": dict(),
    "softmax-unnormalized": dict(normalize=False),
    "sigmoid": dict(score="sigmoid"),
    "deepseek-v3": dict(
        score="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5, bias_update_rate=1e-3
    ),
    "softmax-groups": dict(n_groups=2, topk_groups=1),
    "shared-gated": dict(n_shared_experts=2, shared_gate=True),
    "gelu-bias": dict(activation="gelu", expert_bias=True),
    "relu": dict(activation="relu"),
    # GPT-OSS: router bias, expert biases, clamped SwiGLU with a limit low enough to clamp often.
    "gpt-oss": dict(
        activation="clamped_swiglu", swiglu_limit=0.5, expert_bias=True, router_bias=True
    ),
    "capacity-position": dict(capacity_factor=0.75),
    "capacity-probability": dict(capacity_factor=0.75, drop_policy="probability"),
    "capacity-next-best": dict(capacity_factor=0.75, overflow="next_best"),
    "capacity-next-best-prob": dict(
        capacity_factor=0.5, overflow="next_best", drop_policy="probability", score="sigmoid"
    ),
    "expert-choice": dict(router="expert_choice", capacity_factor=1.0),
    "jitter": dict(noise="jitter"),
    "gaussian": dict(noise="gaussian", load_loss_coef=1e-2, importance_loss_coef=1e-2),
}


def make_layer(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> MoELayer:
    """A layer with a router spread wide enough that selection ties are vanishingly rare."""
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(**{**BASE, **overrides}))
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 1.0)
        if layer.router.bias is not None:
            layer.router.bias.normal_(0.0, 1.0)
        layer.experts.w_in.normal_(0.0, 0.3)
        layer.experts.w_out.normal_(0.0, 0.3)
        if layer.experts.b_in is not None:
            layer.experts.b_in.normal_(0.0, 0.1)
            layer.experts.b_out.normal_(0.0, 0.1)
        layer.router.expert_bias.normal_(0.0, 0.05 if layer.cfg.bias_update_rate else 0.0)
    return layer.to(dtype)


def _row_gaps(values_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the gap between its k-th and (k+1)-th largest finite value (inf if none)."""
    finite = torch.where(torch.isfinite(values_TE), values_TE, torch.full_like(values_TE, -1e9))
    if k >= values_TE.shape[1]:
        return torch.full((values_TE.shape[0],), float("inf"))
    top = finite.topk(k + 1, dim=-1).values
    return top[:, k - 1] - top[:, k]


def tie_free_tokens(layer: MoELayer, n_tokens: int, gap: float = 1e-3) -> torch.Tensor:
    """(n_tokens, d_model) random tokens whose top-k choice (and group choice) is at least `gap`
    from a tie, so that finite differences and references cannot flip a selection."""
    cfg = layer.cfg
    x = torch.randn(64 * n_tokens, cfg.d_model, dtype=layer.router.weight.dtype)
    with torch.no_grad():
        logits = x.double() @ layer.router.weight.double().t()
        if layer.router.bias is not None:
            logits = logits + layer.router.bias.double()
        scores = torch.softmax(logits, -1) if cfg.score == "softmax" else torch.sigmoid(logits)
        selection = scores + layer.router.expert_bias.double()
        ok = _row_gaps(selection, cfg.top_k) > gap
        if cfg.overflow == "next_best":  # ranks beyond the top-k matter: keep them all distinct
            ranked = selection.sort(-1, descending=True).values
            ok &= (ranked[:, :-1] - ranked[:, 1:]).min(-1).values > gap
        if cfg.n_groups > 1:
            grouped = selection.view(-1, cfg.n_groups, cfg.n_experts // cfg.n_groups)
            group_score = grouped.topk(min(2, grouped.shape[-1]), -1).values.sum(-1)
            ok &= _row_gaps(group_score, cfg.topk_groups) > gap
    chosen = x[ok][:n_tokens]
    assert chosen.shape[0] == n_tokens, "could not draw enough tie-free tokens"
    return chosen
