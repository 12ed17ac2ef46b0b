"""Routers against their per-token reference and a hand-computed worked example."""

from __future__ import annotations

import math

import pytest
import torch
from tests.moe_cases import CASES, make_layer, tie_free_tokens

from moekit import MoEConfig, MoELayer
from moekit.routing.reference import reference_logits, reference_route_token

TOKEN_CHOICE = {n: c for n, c in CASES.items() if c.get("router") != "expert_choice"}


@pytest.mark.parametrize("name", TOKEN_CHOICE)
def test_router_matches_per_token_reference(name: str) -> None:
    layer = make_layer(**CASES[name]).eval()
    x = tie_free_tokens(layer, 40)
    routing = layer.router(x)
    bias = layer.router.expert_bias.tolist()
    for t in range(x.shape[0]):
        ids, weights = reference_route_token(routing.logits_TE[t].tolist(), bias, layer.cfg)
        assert routing.ids_TK[t].tolist() == ids
        torch.testing.assert_close(
            routing.weights_TK[t], torch.tensor(weights), rtol=1e-5, atol=1e-6
        )


def test_router_logits_with_bias_match_reference() -> None:
    layer = make_layer(**CASES["gpt-oss"]).eval()
    x = torch.randn(5, layer.cfg.d_model)
    logits = layer.router(x).logits_TE
    weight, bias = layer.router.weight.tolist(), layer.router.bias.tolist()
    for t in range(5):
        want = reference_logits(x[t].tolist(), weight, bias)
        torch.testing.assert_close(logits[t], torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_softmax_normalized_is_gpt_oss_topk_then_softmax() -> None:
    """GPT-OSS takes the top-k logits, then a softmax over those k: the same experts and weights
    as softmax over all experts renormalised over the selected ones."""
    layer = make_layer(**CASES["gpt-oss"]).eval()
    routing = layer.router(tie_free_tokens(layer, 30))
    top_logits, top_ids = routing.logits_TE.topk(layer.cfg.top_k, dim=-1)
    assert torch.equal(routing.ids_TK, top_ids)
    torch.testing.assert_close(routing.weights_TK, top_logits.softmax(-1), rtol=0, atol=1e-6)


def test_logits_are_float32_for_bfloat16_input() -> None:
    layer = make_layer().to(torch.bfloat16)
    routing = layer.router(torch.randn(5, layer.cfg.d_model, dtype=torch.bfloat16))
    assert routing.logits_TE.dtype == torch.float32
    assert routing.weights_TK.dtype == torch.float32


def test_worked_example_eight_experts_top2() -> None:
    """Router weight = identity, so logits = x = (2, 1, 0, ..., 0).

    softmax: s_0 = e^2 / Z, s_1 = e / Z -> top-2 = experts 0 and 1, normalised weights
    e / (e + 1) = 0.731059 and 1 / (e + 1) = 0.268941.
    Expert e (relu, F = 1): hidden = relu(sum(x)) = 3, output = 3 * (e + 1) on coordinate e.
    y = (0.731059 * 3 * 1, 0.268941 * 3 * 2, 0, ...) = (2.193177, 1.613647, 0, ..., 0).
    """
    layer = MoELayer(MoEConfig(d_model=8, d_expert=1, n_experts=8, top_k=2, activation="relu"))
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(8))
        layer.experts.w_in.fill_(1.0)
        layer.experts.w_out.zero_()
        for e in range(8):
            layer.experts.w_out[e, e, 0] = e + 1.0
    x = torch.tensor([[2.0, 1.0, 0, 0, 0, 0, 0, 0]])
    y, aux = layer(x)
    assert aux.ids.tolist() == [[0, 1]]
    torch.testing.assert_close(aux.weights, torch.tensor([[0.731059, 0.268941]]), atol=1e-6, rtol=0)
    expected = torch.tensor([[2.193177, 1.613647, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_sigmoid_group_limited_worked_example() -> None:
    """4 experts in 2 groups, top-1 group, top-2 experts, sigmoid, scaling 2.5.

    logits (3, -3, 1, 0.5): group scores 0.953+0.047=1.0 and 0.731+0.622=1.353, so group 1 wins
    although expert 0 is the best single expert; weights 2.5 * (0.731, 0.622) / 1.353.
    """
    cfg = MoEConfig(
        d_model=4,
        d_expert=2,
        n_experts=4,
        top_k=2,
        score="sigmoid",
        n_groups=2,
        topk_groups=1,
        routed_scaling=2.5,
    )
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    routing = layer.router(torch.tensor([[3.0, -3.0, 1.0, 0.5]]))
    assert routing.ids_TK.tolist() == [[2, 3]]
    s2, s3 = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))
    expected = torch.tensor([[2.5 * s2 / (s2 + s3), 2.5 * s3 / (s2 + s3)]])
    torch.testing.assert_close(routing.weights_TK, expected)


def test_masked_groups_lose_even_to_negative_biased_scores() -> None:
    """Group-limited routing excludes the other groups outright (-inf), as DeepSeek-V3's inference
    code and transformers 5 do. Sigmoid scores (0.982, 0.5, 0.3, 0.3) plus correction bias
    (-0.08, -0.6, 0, 0) = (0.902, -0.1, 0.3, 0.3); group {0, 1} scores 0.802 > 0.6 and wins, so
    top-2 is experts 0 and 1. A 0.0 fill for the masked group (the first remote code) would have
    picked expert 2 or 3 over expert 1's negative biased score."""
    cfg = MoEConfig(
        d_model=4, d_expert=2, n_experts=4, top_k=2, score="sigmoid", n_groups=2, topk_groups=1
    )
    layer = MoELayer(cfg)
    logit_03 = math.log(0.3 / 0.7)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
        layer.router.expert_bias.copy_(torch.tensor([-0.08, -0.6, 0.0, 0.0]))
    routing = layer.router(torch.tensor([[4.0, 0.0, logit_03, logit_03]]))
    assert routing.ids_TK.tolist() == [[0, 1]]
    s0 = 1 / (1 + math.exp(-4.0))
    torch.testing.assert_close(routing.weights_TK, torch.tensor([[s0, 0.5]]) / (s0 + 0.5))


def test_bias_changes_selection_but_never_the_weights() -> None:
    layer = make_layer(score="sigmoid", bias_update_rate=1e-3)
    x = torch.randn(30, layer.cfg.d_model)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    routing = layer.router(x)
    unbiased = torch.sigmoid(routing.logits_TE).gather(1, routing.ids_TK)
    expected = unbiased / unbiased.sum(-1, keepdim=True)
    torch.testing.assert_close(routing.weights_TK, expected)
    assert not layer.router.expert_bias.requires_grad
    assert "expert_bias" not in dict(layer.named_parameters())


def test_expert_choice_takes_each_experts_top_tokens() -> None:
    layer = make_layer(router="expert_choice", capacity_factor=1.0)
    x = torch.randn(16, layer.cfg.d_model)
    routing = layer.router(x)
    C = math.ceil(1.0 * 16 * 2 / 8)
    assert routing.tokens_EC.shape == (8, C)
    scores = torch.softmax(routing.logits_TE, -1)
    for e in range(8):
        best = set(scores[:, e].argsort(descending=True)[:C].tolist())
        assert set(routing.tokens_EC[e].tolist()) == best
        torch.testing.assert_close(routing.gates_EC[e], scores[routing.tokens_EC[e], e])


def test_jitter_and_gaussian_noise_only_in_training() -> None:
    for case in ("jitter", "gaussian"):
        layer = make_layer(**CASES[case])
        x = torch.randn(20, layer.cfg.d_model)
        layer.eval()
        assert torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)
        layer.train()
        assert not torch.equal(layer.router(x).logits_TE, layer.router(x).logits_TE)
