"""Routing metrics on hand-built traces whose answers are known."""

import math

import pytest
import torch

from moekit import losses
from moekit.analysis import metrics

# 4 tokens, top-2 of 4 experts; token 2 lost its second choice to capacity (-1).
IDS = torch.tensor([[0, 1], [0, 2], [3, -1], [0, 1]])


def test_expert_load_counts_kept_assignments_only():
    assert metrics.expert_load(IDS, 4).tolist() == pytest.approx([3 / 7, 2 / 7, 1 / 7, 1 / 7])


def test_max_vio_and_load_entropy_of_shares():
    """The report's figures of a load (shares summing to 1), from moekit.losses."""
    load = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    assert float(losses.max_violation(load)) == pytest.approx(1.0)
    assert float(losses.entropy(torch.full((8,), 1 / 8))) == pytest.approx(math.log(8))


def test_dead_experts_below_a_tenth_of_the_mean():
    load = torch.tensor([0.5, 0.43, 0.05, 0.02])  # mean 0.25: 0.02 < 0.025 <= 0.05
    assert metrics.dead_experts(load) == [3]


def test_repetition_counts_pairs_within_a_sequence():
    ids = torch.tensor([[0, 1], [0, 2], [2, 3], [1, 0], [1, 0]])
    new_seq = torch.tensor([True, False, False, False, True])  # pair (3, 4) crosses sequences
    rep = metrics.repetition(ids, new_seq)
    # pairs (0,1) (1,2) (2,3): first choice equal in 1 of 3; top-2 sets meet in 2 of 3
    assert rep == pytest.approx({"first": 1 / 3, "any": 2 / 3})


def test_repetition_baselines_match_the_mixtral_paper():
    base = metrics.repetition_baselines(8, 2, torch.full((8,), 1 / 8))
    assert base["first_uniform"] == pytest.approx(0.125)
    assert base["first_load_weighted"] == pytest.approx(0.125)
    assert base["any_uniform"] == pytest.approx(13 / 28)  # 46%, Table 5
    skewed = metrics.repetition_baselines(2, 1, torch.tensor([3.0, 1.0]))
    assert skewed["first_load_weighted"] == pytest.approx(0.75**2 + 0.25**2)


def test_coactivation_is_the_share_of_i_tokens_also_on_j():
    co = metrics.coactivation(IDS, 4)
    assert co[0].tolist() == pytest.approx([0, 2 / 3, 1 / 3, 0])  # expert 0 took tokens 0, 1, 3
    assert co[1].tolist() == pytest.approx([1, 0, 0, 0])
    assert co[3].tolist() == pytest.approx([0, 0, 0, 0])  # token 2 went to 3 alone


def test_specialisation_share_of_each_class_per_expert():
    labels = torch.tensor([0, 0, 1, 1])
    spec = metrics.specialisation(IDS, labels, 3, 4)
    assert spec[:, 0].tolist() == pytest.approx([1, 0.5, 0.5, 0])
    assert spec[:, 1].tolist() == pytest.approx([0.5, 0.5, 0, 0.5])
    assert spec[:, 2].tolist() == [0, 0, 0, 0]


def test_specialisation_of_uniform_routing_is_k_over_e():
    ids = torch.tensor([[e, (e + 1) % 4] for e in range(4)])
    spec = metrics.specialisation(ids, torch.zeros(4, dtype=torch.long), 1, 4)
    assert spec.flatten().tolist() == pytest.approx([0.5] * 4)


def test_vocabulary_specialisation():
    tokens = torch.tensor([7, 7, 9, 9])
    ids = torch.tensor([[0], [0], [0], [1]])  # token 7 always on 0; token 9 split 0 / 1
    vs = metrics.vocabulary_specialisation(tokens, ids, 2)
    assert vs["token_ids"].tolist() == [7, 9]
    assert vs["share"].flatten().tolist() == pytest.approx([1, 0, 0.5, 0.5])
    # expert 0: routings 7, 7, 9 with shares 1, 1, 0.5; expert 1: one routing of 9 (0.5)
    assert vs["per_expert"].tolist() == pytest.approx([2.5 / 3, 0.5])
    assert metrics.vocabulary_specialisation(tokens, ids, 2, min_count=3)["share"].shape == (0, 2)


def test_saturation_is_the_top_k_overlap_with_the_final_checkpoint():
    final = torch.tensor([[0, 1], [2, 3]])
    assert metrics.saturation(final, final) == 1.0
    assert metrics.saturation(torch.tensor([[1, 2], [0, 1]]), final) == pytest.approx(0.25)
