"""MoEConfig validation: every invalid combination names the field, the value and the rule."""

from __future__ import annotations

import pytest

from moekit import MoEConfig

BASE = dict(d_model=16, d_expert=32, n_experts=8, top_k=2)

INVALID = [
    (dict(top_k=9), "top_k=9"),
    (dict(top_k=0), "top_k=0"),
    (dict(n_experts=0), "n_experts=0"),
    (dict(d_model=-1), "d_model=-1"),
    (dict(activation="tanh"), "activation='tanh'"),
    (dict(n_groups=3), "n_groups=3"),
    (dict(n_groups=4, topk_groups=5), "topk_groups=5"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "top_k=3"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0"),
    (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
    (dict(bias_update_rate=1e-3, router="expert_choice", capacity_factor=1.0), "bias_update_rate"),
    (dict(router="expert_choice"), "capacity_factor=None"),
    (dict(router="expert_choice", capacity_factor=1.0, n_groups=2), "n_groups=2"),
    (dict(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.01), "aux_loss_coef"),
    (dict(router="expert_choice", capacity_factor=1.0, noise="jitter"), "noise='jitter'"),
    (dict(router="expert_choice", capacity_factor=1.0, overflow="next_best"), "overflow"),
    (dict(router="sparse"), "router='sparse'"),
    (dict(score="relu"), "score='relu'"),
    (dict(noise="uniform"), "noise='uniform'"),
    (dict(noise="jitter", noise_eps=1.5), "noise_eps=1.5"),
    (dict(load_loss_coef=0.1), "load_loss_coef=0.1"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef=-0.1"),
    (dict(aux_loss_scope="token"), "aux_loss_scope='token'"),
    (dict(drop_policy="random"), "drop_policy='random'"),
    (dict(overflow="retry"), "overflow='retry'"),
    (dict(expert_impl="triton"), "expert_impl='triton'"),
    (dict(d_shared=64), "d_shared=64"),
    (dict(shared_gate=True), "shared_gate=True"),
    (dict(routed_scaling=0.0), "routed_scaling=0.0"),
]


@pytest.mark.parametrize("overrides,named", INVALID, ids=[n for _, n in INVALID])
def test_invalid_config_raises_naming_field_and_value(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError) as err:
        MoEConfig(**{**BASE, **overrides})
    assert named in str(err.value)


def test_error_says_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"must be <= n_experts \(8\)"):
        MoEConfig(**{**BASE, "top_k": 9})


def test_json_round_trip() -> None:
    cfg = MoEConfig(**BASE, score="sigmoid", n_groups=4, topk_groups=2, capacity_factor=1.25)
    assert MoEConfig.from_json(cfg.to_json()) == cfg


def test_unknown_key_in_json_is_an_error() -> None:
    with pytest.raises(ValueError, match="topk"):
        MoEConfig.from_dict({**BASE, "topk": 2})


def test_shared_width_defaults_to_n_shared_times_d_expert() -> None:
    assert MoEConfig(**BASE, n_shared_experts=2).shared_width == 64
    assert MoEConfig(**BASE, n_shared_experts=2, d_shared=48).shared_width == 48
