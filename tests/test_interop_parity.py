"""Hugging Face checkpoints <-> MoETransformer, for every architecture: moekit's logits equal
transformers' (eager attention and experts, float32, max abs difference <= 1e-5), saved
checkpoints load in transformers with no missing or unexpected keys, both expert key layouts
round-trip exactly, and greedy generation matches token for token."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from tests.c_kernels import needs_c_kernels
from tests.interop_cases import (
    CASES,
    hf_config,
    load_transformers,
    max_logit_diff,
    min_routing_gap,
    randomize,
    save_hf_case,
    tokens,
)
from tests.test_decode_layers import _count_calls

from moekit import MoETransformer
from moekit.inference.decode_block import blocks_in_one_call
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.inference.decode_step import decodes_in_one_call
from moekit.interop import ARCHITECTURES, hf_model_config, load_hf, save_hf
from moekit.interop.archs import ARCHS
from moekit.model import generate

ATOL = 1e-5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Each case's transformers checkpoint, written once per test worker."""
    root = tmp_path_factory.mktemp("hf")
    return {case: save_hf_case(case, root / case) for case in CASES}


def _no_loading_problems(info: dict) -> None:
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), problems


def test_every_registered_architecture_has_a_case_here() -> None:
    """A file added to `moekit.interop.archs` is tested once tests/interop_cases.py has a case
    for it, named as transformers names its model class."""
    assert {arch for arch, *_ in CASES.values()} == set(ARCHITECTURES)
    for arch, _, model_class, _ in CASES.values():
        assert ARCHS[arch].model_type == arch and ARCHS[arch].class_name == model_class


@pytest.mark.parametrize("case", CASES)
def test_load_hf_logits_equal_transformers(case: str, checkpoints: dict) -> None:
    ours = load_hf(checkpoints[case])
    theirs, _ = load_transformers(case, checkpoints[case])
    assert min_routing_gap(ours, tokens()) > 1e-4  # no near-tie: both route the same
    assert max_logit_diff(ours, theirs, tokens()) <= ATOL


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("case", CASES)
def test_save_hf_of_a_moekit_model_loads_in_transformers(case: str, layout: str, tmp_path) -> None:
    arch = CASES[case][0]
    cfg = hf_model_config(hf_config(case).to_dict())
    ours = randomize(MoETransformer(cfg), seed=3, correction_bias=arch == "deepseek_v3").eval()
    save_hf(ours, tmp_path / "out", arch, layout=layout)
    theirs, info = load_transformers(case, tmp_path / "out")
    _no_loading_problems(info)
    assert min_routing_gap(ours, tokens(seed=2)) > 1e-4
    assert max_logit_diff(ours, theirs, tokens(seed=2)) <= ATOL


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trips_exactly_in_both_layouts(
    case: str, layout: str, checkpoints: dict, tmp_path
) -> None:
    first = load_hf(checkpoints[case])
    save_hf(first, tmp_path / "a", CASES[case][0], layout=layout)
    second = load_hf(tmp_path / "a")
    assert second.cfg == first.cfg
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_layouts_differ_on_disk_as_transformers_expects(case: str, checkpoints: dict, tmp_path):
    """per_expert writes what transformers' save_pretrained writes; fused its in-memory names."""
    from safetensors import safe_open

    model = load_hf(checkpoints[case])
    keys = {}
    for layout in ("per_expert", "fused"):
        save_hf(model, tmp_path / layout, CASES[case][0], layout=layout)
        with safe_open(str(tmp_path / layout / "model.safetensors"), "pt") as f:
            keys[layout] = set(f.keys())
    with safe_open(str(checkpoints[case] / "model.safetensors"), "pt") as f:
        assert keys["per_expert"] == set(f.keys())
    assert any(
        k.endswith("experts.0.down_proj.weight") or k.endswith("experts.0.w2.weight")
        for k in keys["per_expert"]
    )
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in keys["fused"])


@pytest.mark.parametrize(
    "kernels", [False, pytest.param(True, marks=needs_c_kernels)], ids=["plain", "decode_kernels"]
)
@pytest.mark.parametrize("case", CASES)
def test_greedy_generation_matches_token_for_token(
    case: str, kernels: bool, checkpoints, monkeypatch
) -> None:
    """Plain PyTorch, and with the decode kernels and glue as `moekit generate` applies them:
    transformers' greedy tokens. With the kernels every case decodes each step in one C call,
    every block in it (Qwen2-MoE's shared expert, dense layers, DeepSeek-V3's latent attention and
    group-limited routing)."""
    ours = load_hf(checkpoints[case])
    if kernels:
        ours = apply_decode_kernels(ours)
    theirs, _ = load_transformers(case, checkpoints[case])
    prompt = tokens(batch=1, length=6, seed=4)
    want = theirs.generate(
        prompt, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[:, prompt.shape[1] :]
    calls = _count_calls(monkeypatch, ran_only=True) if kernels else {}
    got = generate(ours, prompt, 20)
    assert got.tolist() == want.tolist()
    if kernels:
        assert blocks_in_one_call(ours) == len(ours.layers)
        assert decodes_in_one_call(ours)
        assert calls.get("moekit_decode_tokens", 0) == 19  # each step after the prompt, in C


def test_sharded_checkpoint_has_an_index_and_loads_both_ways(checkpoints: dict, tmp_path) -> None:
    model = load_hf(checkpoints["qwen2_moe"])
    save_hf(model, tmp_path / "sharded", "qwen2_moe", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "sharded" / s).is_file() for s in shards)
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    theirs, info = load_transformers("qwen2_moe", tmp_path / "sharded")
    _no_loading_problems(info)
    assert max_logit_diff(model, theirs, tokens()) <= ATOL
    again = load_hf(tmp_path / "sharded")
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_bfloat16_load_keeps_the_correction_bias_float32(checkpoints: dict) -> None:
    model = load_hf(checkpoints["deepseek_v3"], dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    router = model.moe_layers()[0].router
    assert router.expert_bias.dtype == torch.float32 and router.expert_bias.min() < 0
    ref = load_hf(checkpoints["deepseek_v3"])
    torch.testing.assert_close(router.expert_bias, ref.moe_layers()[0].router.expert_bias)
