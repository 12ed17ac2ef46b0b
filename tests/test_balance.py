"""Balancing in action: aux-loss-free bias updates and the balance losses pull load to uniform."""

from __future__ import annotations

import torch

from moekit import MoEConfig, MoELayer


def _skewed_layer(**overrides) -> tuple[MoELayer, torch.Tensor]:
    """A router whose logits favour experts 0 and 1 for almost every token."""
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=16, d_expert=8, n_experts=8, top_k=2, score="sigmoid", **overrides)
    layer = MoELayer(cfg)
    x = torch.randn(512, 16)
    x[:, 0] = 3.0  # a shared direction
    with torch.no_grad():
        layer.router.weight.normal_(0, 0.3)
        layer.router.weight[:2, 0] = 1.0
    return layer, x


def test_bias_update_moves_load_toward_uniform_and_leaves_weights_alone() -> None:
    layer, x = _skewed_layer(bias_update_rate=1e-3)
    layer.train()
    start = layer(x)[1].max_vio.item()
    for _ in range(300):
        layer(x)
        layer.update_expert_bias()
    _, aux = layer(x)
    assert start > 2.0 and aux.max_vio.item() < 0.5 * start and aux.max_vio.item() < 0.6
    # The bias chose the experts, but the weights are still the unbiased, normalised scores.
    scores = torch.sigmoid(x @ layer.router.weight.t()).gather(1, aux.ids)
    torch.testing.assert_close(aux.weights, scores / scores.sum(-1, keepdim=True))
    assert layer.router.expert_bias.abs().max() > 0


def test_bias_update_uses_counts_since_last_call_then_clears_them() -> None:
    layer, x = _skewed_layer(bias_update_rate=0.01)
    layer.train()
    layer(x[:100])
    layer(x[100:300])  # two micro-batches accumulate
    assert int(layer.bias_counts.sum()) == 300 * 2
    expected = 0.01 * torch.sign(layer.bias_counts.mean() - layer.bias_counts)
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert int(layer.bias_counts.sum()) == 0
    layer.eval()
    layer(x)
    assert int(layer.bias_counts.sum()) == 0, "evaluation must not feed the balancing counts"


def test_aux_loss_gradient_descent_reduces_imbalance() -> None:
    layer, x = _skewed_layer(aux_loss_coef=1.0)
    opt = torch.optim.SGD(layer.router.parameters(), lr=0.5)
    start = layer(x)[1].max_vio.item()
    for _ in range(100):
        _, aux = layer(x)
        opt.zero_grad()
        aux.loss.backward()
        opt.step()
    assert layer(x)[1].max_vio.item() < 0.5 * start
