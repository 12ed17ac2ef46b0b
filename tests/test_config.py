"""Config validation: each type hint's rule (ConfigBase), and every invalid combination of
MoEConfig's fields names the field, the value and the rule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import pytest

from moekit import MoEConfig
from moekit.config import ConfigBase
from moekit.config.rules import In

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


@dataclass(kw_only=True)
class Probe(ConfigBase):
    """One field of each kind of type hint ConfigBase has a rule for."""

    flag: bool = False
    count: int = 1
    offset: Annotated[int, In("[0, inf)")] = 0
    scale: float = 1.0
    share: Annotated[float, In("(0, 1]")] = 0.5
    name: str = "a"
    mode: Literal["x", "y"] = "x"
    limit: int | None = None
    sizes: tuple[int, ...] = ()
    pair: tuple[float, float] = (1.0, 2.0)
    moe: MoEConfig | None = None


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("flag", 1, "flag=1 is invalid: must be True or False"),
        ("count", 0, "count=0 is invalid: must be an integer >= 1"),
        ("count", 2.0, "count=2.0 is invalid: must be an integer >= 1"),
        ("count", True, "count=True is invalid: must be an integer >= 1"),
        ("offset", -1, "offset=-1 is invalid: must be an integer >= 0"),
        ("scale", 0.0, "scale=0.0 is invalid: must be > 0 and finite"),
        ("scale", math.inf, "scale=inf is invalid: must be > 0 and finite"),
        ("scale", "1", "scale='1' is invalid: must be a number > 0 and finite"),
        ("share", 1.5, "share=1.5 is invalid: must be a number in (0, 1]"),
        ("name", 3, "name=3 is invalid: must be a string"),
        ("mode", "z", "mode='z' is invalid: allowed values are 'x', 'y'"),
        ("limit", 0, "limit=0 is invalid: must be an integer >= 1 or None"),
        ("sizes", (1, 0), "sizes=0 is invalid: must be an integer >= 1 (each item of sizes)"),
        ("sizes", 3, "sizes=3 is invalid: must be a list, each item an integer >= 1"),
        (
            "pair",
            (1.0,),
            "pair=(1.0,) is invalid: must be a list of 2: a number > 0 and finite, a number > 0 "
            "and finite",
        ),
        ("moe", {"d_model": 8}, "moe={'d_model': 8} is invalid: must be a MoEConfig or None"),
    ],
)
def test_each_type_hint_has_one_rule_and_its_error_says_what_is_allowed(
    field: str, value: object, says: str
) -> None:
    with pytest.raises(ValueError) as err:
        Probe(**{field: value})
    assert str(err.value) == says


def test_allowed_values_pass_and_lists_become_tuples() -> None:
    probe = Probe(flag=True, count=3, offset=0, scale=2, share=1.0, name="", mode="y", limit=4,
                  sizes=[1, 2], pair=[0.5, 3.0], moe=MoEConfig(**BASE))  # fmt: skip
    assert probe.sizes == (1, 2) and probe.pair == (0.5, 3.0) and probe.scale == 2


def test_from_dict_builds_nested_configs_and_names_the_path_of_an_error() -> None:
    probe = Probe.from_dict({"moe": BASE, "sizes": [4]})
    assert probe.moe == MoEConfig(**BASE) and probe.sizes == (4,)
    assert Probe.from_json(probe.to_json()) == probe
    with pytest.raises(ValueError, match=r"^moe\.top_k=9 is invalid: must be <= n_experts \(8\)"):
        Probe.from_dict({"moe": {**BASE, "top_k": 9}})
    with pytest.raises(ValueError, match=r"^moe: MoEConfig needs the field\(s\) \['d_expert'"):
        Probe.from_dict({"moe": {"d_model": 8}})
