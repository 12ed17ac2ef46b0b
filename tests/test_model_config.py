"""ModelConfig validation, layer selection, presets and JSON round-trip."""

from __future__ import annotations

import re

import pytest

from moekit import ModelConfig, MoEConfig
from moekit.config import MODEL_PRESETS

MOE = MoEConfig(d_model=64, d_expert=32, n_experts=4, top_k=2)
BASE = dict(vocab_size=100, d_model=64, n_layers=4, n_heads=4, d_ff=128, moe=MOE)

INVALID = [
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(d_model=-64), "d_model=-64"),
    (dict(n_layers=0), "n_layers=0"),
    (dict(n_heads=0), "n_heads=0"),
    (dict(n_kv_heads=3), "n_kv_heads=3"),
    (dict(n_heads=3), "head_dim=None"),
    (dict(head_dim=15), "head_dim=15"),
    (dict(d_ff=0), "d_ff=0"),
    (dict(moe=MoEConfig(d_model=32, d_expert=32, n_experts=4)), "moe.d_model=32"),
    (dict(moe={"d_model": 64}), "moe="),
    (dict(moe_layers=0), "moe_layers=0"),
    (dict(moe_layers="odd"), "moe_layers='odd'"),
    (dict(moe_layers=(1, 4)), "moe_layers=(1, 4)"),
    (dict(moe_layers=(1, 1)), "moe_layers=(1, 1)"),
    (dict(first_dense=-1), "first_dense=-1"),
    (dict(first_dense=5), "first_dense=5"),
    (dict(first_dense=4), "moe_layers='all'"),
    (dict(first_dense=1, d_ff=None), "d_ff=None"),
    (dict(max_seq_len=0), "max_seq_len=0"),
    (dict(rope_theta=0.0), "rope_theta=0.0"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(norm_eps=-1e-5), "norm_eps=-1e-05"),
    (dict(qk_norm="layer"), "qk_norm='layer'"),
    (dict(clip_qkv=-1.0), "clip_qkv=-1.0 is invalid: must be > 0"),
    (dict(clip_qkv=float("nan")), "clip_qkv=nan"),
    (dict(tie_embeddings="yes"), "tie_embeddings='yes'"),
]


@pytest.mark.parametrize(("changes", "message"), INVALID, ids=[m for _, m in INVALID])
def test_invalid_config_names_the_field_and_value(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**{**BASE, **changes})


def test_json_round_trip_keeps_nested_moe_and_layer_tuple() -> None:
    cfg = ModelConfig(**BASE, moe_layers=[1, 3], sliding_window=8, qk_norm="head")
    back = ModelConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.moe, MoEConfig) and back.moe_layers == (1, 3)


@pytest.mark.parametrize("name", list(MODEL_PRESETS))
def test_every_preset_round_trips_through_json(name: str) -> None:
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_unknown_preset_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"preset='nope'.*tiny, small, dense-small, mixtral-8x7b"):
        ModelConfig.preset("nope")


@pytest.mark.parametrize(
    ("moe_layers", "first_dense", "expected"),
    [
        ("all", 0, [0, 1, 2, 3, 4, 5]),
        ("all", 2, [2, 3, 4, 5]),
        (2, 0, [1, 3, 5]),
        (3, 0, [2, 5]),
        (2, 2, [3, 5]),
        ((0, 4), 0, [0, 4]),
        ((4, 0, 5), 1, [4, 5]),
    ],
)
def test_moe_layer_indices(moe_layers: object, first_dense: int, expected: list[int]) -> None:
    cfg = ModelConfig(**{**BASE, "n_layers": 6}, moe_layers=moe_layers, first_dense=first_dense)
    assert cfg.moe_layer_indices == expected


def test_dense_model_has_no_moe_layers() -> None:
    assert ModelConfig(**{**BASE, "moe": None}).moe_layer_indices == []


def test_defaults_derive_kv_heads_and_head_width() -> None:
    cfg = ModelConfig(**BASE)
    assert (cfg.kv_heads, cfg.d_head) == (4, 16)
    explicit = cfg.replace(n_kv_heads=2, head_dim=32)
    assert (explicit.kv_heads, explicit.d_head) == (2, 32)


def test_dense_small_matches_small_but_dense() -> None:
    small, dense = ModelConfig.preset("small"), ModelConfig.preset("dense-small")
    assert small.moe is not None and dense.moe is None
    assert dense.d_ff == small.moe.top_k * small.moe.d_expert
    assert dense.replace(moe=small.moe, d_ff=small.d_ff) == small


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("model", "moe", "top_k"), 99, "model.moe.top_k=99 is invalid"),
        (("model", "moe", "bogus"), 1, "model.moe: MoEConfig has no field(s) ['bogus']"),
        (("train", "eval", "every"), -1, "train.eval.every=-1 is invalid"),
    ],
)
def test_a_nested_config_error_names_the_path_to_its_field(
    path: tuple[str, ...], value: object, message: str
) -> None:
    from moekit.config import RunConfig

    data = RunConfig.preset("small").to_dict()
    inner = data
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        RunConfig.from_dict(data)
