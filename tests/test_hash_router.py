"""Hash routing (Roller 2021): a fixed, balanced map from token id to expert."""

from __future__ import annotations

import pytest
import torch

from moekit import ModelConfig, MoEConfig, MoELayer, MoETransformer
from moekit.routing.hash import hash_experts


def test_the_map_is_balanced_over_the_vocabulary():
    ids = hash_experts(torch.arange(8 * 50), 8)
    assert torch.bincount(ids[:, 0], minlength=8).tolist() == [50] * 8
    counts = torch.bincount(hash_experts(torch.arange(403), 8)[:, 0], minlength=8)
    assert counts.max() - counts.min() <= 1


def test_blocks_are_rotated_differently_and_top_k_experts_are_distinct():
    first = hash_experts(torch.arange(64), 8)[:, 0].view(8, 8)
    assert len({row[0].item() for row in first}) > 1  # not simply id % E
    ids = hash_experts(torch.arange(100), 8, top_k=3)
    assert all(len(set(row.tolist())) == 3 for row in ids)
    assert torch.equal(ids, hash_experts(torch.arange(100), 8, top_k=3))  # fixed


def test_a_hash_layer_sends_each_token_to_its_experts_with_equal_weights():
    layer = MoELayer(MoEConfig(d_model=16, d_expert=32, n_experts=4, top_k=2, router="hash"))
    token_ids = torch.randint(0, 100, (2, 5))
    y, aux = layer(torch.randn(2, 5, 16), token_ids)
    assert y.shape == (2, 5, 16)
    assert torch.equal(aux.ids, hash_experts(token_ids.flatten(), 4, 2))
    assert torch.all(aux.weights == 0.5)
    with pytest.raises(ValueError, match="routes by token id"):
        layer(torch.randn(3, 16))


def test_a_hash_routed_transformer_routes_by_input_ids_and_trains():
    cfg = ModelConfig.preset("tiny")
    model = MoETransformer(cfg.replace(moe=cfg.moe.replace(router="hash", top_k=1)))
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(ids, labels=ids)
    out.loss.backward()
    for aux in out.aux:
        assert torch.equal(aux.ids, hash_experts(ids.flatten(), cfg.moe.n_experts))
    assert model.layers[0].ffn.experts.w_in.grad.abs().sum() > 0
