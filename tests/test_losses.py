"""Balance losses and metrics on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import losses


def test_switch_loss_is_one_under_uniform_routing() -> None:
    E, T, K = 8, 16, 2
    probs = torch.full((T, E), 1.0 / E)
    ids = torch.arange(T * K).remainder(E).view(T, K)
    assert losses.switch_balance_loss(probs, ids).item() == pytest.approx(1.0)


def test_switch_loss_is_E_when_collapsed_onto_one_expert() -> None:
    E, T = 4, 10
    probs = torch.zeros(T, E)
    probs[:, 2] = 1.0
    ids = torch.full((T, 1), 2)
    assert losses.switch_balance_loss(probs, ids).item() == pytest.approx(E)


def test_sequence_scope_sees_imbalance_that_the_batch_hides() -> None:
    """Sequence 0 sends everything to expert 0, sequence 1 to expert 1."""
    probs = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    ids = torch.tensor([[0]] * 3 + [[1]] * 3)
    batch = losses.switch_balance_loss(probs, ids, n_sequences=1)
    per_sequence = losses.switch_balance_loss(probs, ids, n_sequences=2)
    assert batch.item() == pytest.approx(1.0)  # 2 * (0.5 * 0.5 + 0.5 * 0.5)
    assert per_sequence.item() == pytest.approx(2.0)  # each sequence: 2 * (1 * 1)


def test_z_loss_of_zero_logits_is_log_E_squared() -> None:
    assert losses.z_loss(torch.zeros(5, 8)).item() == pytest.approx(math.log(8) ** 2)


def test_z_loss_is_the_mean_of_each_tokens_squared_logsumexp() -> None:
    """Rows whose logsumexp differ: the mean of the squares, not the square of the mean.
    Row 0: logsumexp = log 4; row 1 (every logit 2 higher): log 4 + 2."""
    logits = torch.stack([torch.zeros(4), torch.full((4,), 2.0)])
    expected = (math.log(4) ** 2 + (math.log(4) + 2) ** 2) / 2  # (1.92 + 11.47) / 2 = 6.70
    assert losses.z_loss(logits).item() == pytest.approx(expected)


def test_cv_squared() -> None:
    assert losses.cv_squared(torch.tensor([2.0, 2.0, 2.0])).item() == pytest.approx(0.0)
    # mean 2, population variance 1 -> 1 / 4
    assert losses.cv_squared(torch.tensor([1.0, 3.0])).item() == pytest.approx(0.25)


def test_importance_loss_sums_gates_per_expert() -> None:
    ids = torch.tensor([[0, 1], [0, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    # importance (1.5, 0.5, 0, 0): mean 0.5, variance (1 + 0 + 0.25 + 0.25) / 4 = 0.375
    got = losses.cv_squared(losses.expert_importance(weights, ids, n_experts=4))
    assert got.item() == pytest.approx(0.375 / 0.25)


def test_load_probabilities_match_monte_carlo() -> None:
    """P(t, i) is the chance that expert i stays in the top-k when only its own noise is redrawn."""
    torch.manual_seed(1)
    clean = torch.randn(1, 6)
    std = torch.rand(1, 6) + 0.5
    noisy = clean + torch.randn(1, 6) * std
    k = 2
    probs = losses.load_probabilities(clean, noisy, std, k)[0]
    draws = 20000
    for i in range(6):
        resampled = noisy.repeat(draws, 1)
        resampled[:, i] = clean[0, i] + torch.randn(draws) * std[0, i]
        in_top = (resampled.topk(k, -1).indices == i).any(-1).float().mean()
        assert probs[i].item() == pytest.approx(in_top.item(), abs=0.015)


def test_max_violation_and_entropy() -> None:
    assert losses.max_violation(torch.tensor([10, 10, 10, 10])).item() == pytest.approx(0.0)
    assert losses.max_violation(torch.tensor([30, 10, 0, 0])).item() == pytest.approx(2.0)
    uniform = torch.full((3, 8), 1 / 8)
    assert losses.entropy(uniform).tolist() == pytest.approx([math.log(8)] * 3)
    assert losses.entropy(torch.eye(4)).tolist() == pytest.approx([0.0] * 4)
