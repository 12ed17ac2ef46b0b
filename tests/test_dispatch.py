"""Dispatch: capacity assignment against its reference, and the properties every dispatch keeps."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.moe_cases import make_layer, tie_free_tokens

from moekit import MoEConfig, MoELayer
from moekit.dispatch import capacity_assignment, combine
from moekit.dispatch.reference import reference_capacity_assignment
from moekit.routing import expert_capacity


@pytest.mark.parametrize("policy", ["position", "probability"])
@pytest.mark.parametrize("overflow", ["drop", "next_best"])
@pytest.mark.parametrize("factor", [0.25, 0.5, 1.0, 1.5])
def test_capacity_assignment_matches_reference(policy: str, overflow: str, factor: float) -> None:
    layer = make_layer(capacity_factor=factor, drop_policy=policy, overflow=overflow)
    routing = layer.router(tie_free_tokens(layer, 48))
    C = expert_capacity(48, layer.cfg)
    got = capacity_assignment(routing, C, policy, overflow)
    want = reference_capacity_assignment(
        routing.ids_TK, routing.weights_TK, routing.selection_TE, C, policy, overflow
    )
    assert got.tolist() == want


def test_position_priority_serves_all_first_choices_first() -> None:
    """Expert 0 is every token's first choice; with C=2 tokens 0 and 1 keep it, and no second
    choice of expert 0 is kept even for token 0."""
    ids = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.55, 0.45]])
    selection = torch.rand(4, 4)
    ref = reference_capacity_assignment(ids, weights, selection, 2, "position", "drop")
    assert ref == [[0, 1], [0, 2], [-1, 3], [1, -1]]
    ref = reference_capacity_assignment(ids, weights, selection, 2, "probability", "drop")
    assert ref == [[-1, 1], [0, 2], [0, 3], [1, -1]]


def test_capacity_formula() -> None:
    cfg = MoEConfig(d_model=8, d_expert=8, n_experts=8, top_k=2, capacity_factor=1.25)
    assert expert_capacity(100, cfg) == math.ceil(1.25 * 100 * 2 / 8) == 32


def test_dropped_assignment_contributes_zero_and_others_keep_their_weight() -> None:
    layer = make_layer(capacity_factor=0.25).eval()
    x = tie_free_tokens(layer, 40)
    _, aux = layer(x)
    dropped = aux.ids < 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(aux.weights[dropped], torch.zeros(int(dropped.sum())))
    routing = layer.router(x)
    torch.testing.assert_close(aux.weights[~dropped], routing.weights_TK[~dropped])


def test_next_best_moves_weight_under_original_normaliser() -> None:
    layer = make_layer(capacity_factor=0.9, overflow="next_best").eval()
    x = tie_free_tokens(layer, 40)
    _, aux = layer(x)
    routing = layer.router(x)
    moved = (aux.ids >= 0) & (aux.ids != routing.ids_TK)
    assert moved.any()
    t, k = moved.nonzero()[0].tolist()
    e = int(aux.ids[t, k])
    assert e not in routing.ids_TK[t].tolist()
    expected = routing.scores_TE[t, e] / routing.scores_TE[t, routing.ids_TK[t]].sum()
    torch.testing.assert_close(aux.weights[t, k], expected)


ROUTERS = st.sampled_from(
    [
        dict(),
        dict(normalize=False),
        dict(score="sigmoid", routed_scaling=2.5),
        dict(score="sigmoid", n_groups=4, topk_groups=2, routed_scaling=2.5),
    ]
)


@settings(max_examples=40, deadline=None)
@given(
    router=ROUTERS,
    n_experts=st.sampled_from([4, 8, 16]),
    top_k=st.integers(1, 4),
    n_tokens=st.integers(1, 40),
    factor=st.one_of(st.none(), st.floats(0.1, 2.5)),
    policy=st.sampled_from(["position", "probability"]),
    overflow=st.sampled_from(["drop", "next_best"]),
    seed=st.integers(0, 2**16),
)
def test_dispatch_properties(router, n_experts, top_k, n_tokens, factor, policy, overflow, seed):
    groups = router.get("n_groups", 1)
    if n_experts % groups or top_k > (n_experts // groups) * router.get("topk_groups", 1):
        return
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=8,
        d_expert=4,
        n_experts=n_experts,
        top_k=top_k,
        capacity_factor=factor,
        drop_policy=policy,
        overflow=overflow,
        **router,
    )
    layer = MoELayer(cfg)
    _, aux = layer(torch.randn(n_tokens, 8) * 3)
    assert torch.isfinite(aux.weights).all() and (aux.weights >= 0).all()
    dropped = int((aux.ids < 0).sum())
    assert int(aux.counts.sum()) == n_tokens * top_k - dropped
    assert torch.equal(aux.counts, torch.bincount(aux.ids[aux.ids >= 0], minlength=n_experts))
    if factor is None:
        assert dropped == 0
        if cfg.normalize:
            sums = aux.weights.sum(-1)
            torch.testing.assert_close(sums, torch.full_like(sums, cfg.routed_scaling))
    else:
        assert int(aux.counts.max()) <= expert_capacity(n_tokens, cfg)
    for row in aux.ids.tolist():  # a token never uses one expert twice
        kept = [e for e in row if e >= 0]
        assert len(kept) == len(set(kept))
    torch.testing.assert_close(aux.dropped_fraction, torch.tensor(dropped / (n_tokens * top_k)))


def test_expert_choice_counts_are_capacity_and_tokens_may_go_unserved() -> None:
    layer = make_layer(router="expert_choice", capacity_factor=0.5)
    _, aux = layer(torch.randn(32, layer.cfg.d_model))
    assert aux.counts.tolist() == [math.ceil(0.5 * 32 * 2 / 8)] * 8
    assert aux.ids is None and aux.weights is None


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_chunked_combine_matches_reference(dtype: torch.dtype, tol: float, monkeypatch) -> None:
    """The chunked autograd combine against its one-shot twin, forward and gradients; small
    chunks so that several chunks and a ragged last one are exercised."""
    monkeypatch.setattr(combine, "CHUNK_ROWS", 7)
    T, R, D = 9, 30, 5
    token = torch.randint(0, T, (R,))
    y = torch.randn(R, D, dtype=dtype, requires_grad=True)
    w = torch.rand(R, requires_grad=True)
    grad_out = torch.randn(T, D, dtype=dtype)
    got = combine.scatter_weighted(y, w, token, T)
    (got * grad_out).sum().backward()
    g_y, g_w = y.grad.clone(), w.grad.clone()
    y.grad = w.grad = None
    want = combine.scatter_weighted_reference(y, w, token, T)
    (want * grad_out).sum().backward()
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(g_y, y.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(g_w, w.grad, rtol=tol, atol=tol)
