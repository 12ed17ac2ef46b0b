"""Bad checkpoints and impossible exports fail with one clear error, before anything is loaded or
written: unsupported architectures, missing / unexpected / misshapen tensors, truncated or corrupt
files, quantized checkpoints, and models an architecture cannot express."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from tests.interop_cases import hf_config, save_hf_case

from moekit import ModelConfig, MoEConfig, MoETransformer
from moekit.interop import CheckpointError, hf_model_config, load_hf, save_hf
from moekit.interop.configs import rope_scaling, rope_theta


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> Path:
    return save_hf_case("mixtral", tmp_path_factory.mktemp("hf") / "mixtral")


def copy_of(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(folder, out)
    return out


def edit_weights(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_unsupported_architecture_is_named(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg |= {"model_type": "llama4_text", "architectures": ["Llama4ForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"'llama4_text'.*Llama4ForCausalLM.*mixtral"):
        load_hf(folder)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"num_local_experts": "6"}, "num_local_experts (moekit's n_experts)='6' is invalid"),
        ({"hidden_size": None}, "hidden_size (moekit's d_model)=None is invalid"),
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps (moekit's norm_eps)='1e-5' is invalid"),
        ({"num_experts_per_tok": 10}, "num_experts_per_tok (moekit's top_k)=10 is invalid"),
        ({"model_type": None}, "config.json has no model_type (architectures: ['Mixtral"),
        # divided by before the rules ran: "a count it divides by is 0 (heads, say)"
        ({"num_attention_heads": 0}, "num_attention_heads (moekit's n_heads)=0 is invalid"),
        # not "sliding_window (moekit's head_dim)=None": the one other key holding None
        ({"hidden_size": "64"}, "hidden_size (moekit's d_model)='64' is invalid"),
    ],
)
def test_a_bad_config_value_is_named_by_its_config_json_key(
    mixtral_dir: Path, tmp_path: Path, change: dict, says: str, capsys
) -> None:
    """The errors named moekit's fields (n_experts='6'), not the file or its keys; a missing
    model_type said "architecture None (['MixtralForCausalLM']) is not supported"."""
    from moekit.cli import main

    folder = copy_of(mixtral_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text()) | change
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in cfg.items() if v or k != "model_type"})
    )
    assert main(["convert", "--from-hf", str(folder), f"--out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err
    assert str(folder / "config.json") in err
    assert not (tmp_path / "run").exists()


def test_a_bad_value_under_an_alias_is_named_by_the_key_given(mixtral_dir: Path) -> None:
    """A config.json holding num_experts (Mixtral's alias of num_local_experts, transformers'
    attribute_map) was named as num_local_experts, a key the file does not have."""
    from moekit.interop.hf import hf_model_config

    cfg = json.loads((mixtral_dir / "config.json").read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts") + 0.5
    with pytest.raises(CheckpointError, match=r"num_experts \(moekit's n_experts\)=\d\.5 is"):
        hf_model_config(cfg)


def test_missing_tensors_are_listed(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    edit_weights(folder, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.1\..*experts\.3\.w2"):
        load_hf(folder)


def test_unexpected_tensors_are_listed(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    edit_weights(folder, lambda t: t.update({"model.layers.0.mystery.weight": torch.ones(3)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.layers\.0\.mystery\.weight"):
        load_hf(folder)


def test_shape_mismatch_names_the_tensor_and_both_shapes(mixtral_dir: Path, tmp_path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    key = "model.layers.2.self_attn.k_proj.weight"
    edit_weights(folder, lambda t: t.update({key: torch.zeros(20, 40)}))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(20, 40\).*needs \(24, 40\)"):
        load_hf(folder)


def test_truncated_file_is_reported_as_such(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf(folder)


def test_corrupt_header_is_reported_as_such(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[8:12] = b"\x00\xff\x00\xff"  # inside the JSON header
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf(folder)


def test_index_naming_a_missing_shard(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    model = load_hf(folder)
    save_hf(model, tmp_path / "sharded", "mixtral", max_shard_size="60KB")
    shard = sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"lists {shard.name}.*does not exist"):
        load_hf(tmp_path / "sharded")


def test_a_folder_with_one_file_and_shards_loads_the_one_file_as_transformers_does(
    mixtral_dir: Path, tmp_path: Path
) -> None:
    """transformers takes model.safetensors before the index; moekit took the shards, so such a
    folder gave a model other than transformers'."""
    model = load_hf(mixtral_dir)
    folder = tmp_path / "both"
    save_hf(model, folder, "mixtral", max_shard_size="60KB")
    other = MoETransformer(model.cfg)  # other weights, in the one file
    save_hf(other, tmp_path / "single", "mixtral")
    shutil.copy(tmp_path / "single" / "model.safetensors", folder)
    assert (folder / "model.safetensors.index.json").is_file()
    loaded = load_hf(folder).state_dict()
    for name, tensor in other.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)


def test_no_weights_and_bin_weights_are_explained(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"neither model\.safetensors.*\.bin"):
        load_hf(folder)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf(tmp_path / "nowhere")


def test_unsupported_quantization_is_refused(mixtral_dir: Path, tmp_path: Path) -> None:
    """FP8 and MXFP4 load (tests/test_quant_formats.py); another quant_method is named."""
    folder = copy_of(mixtral_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method='awq' is not supported"):
        load_hf(folder)


def test_config_styles_rope_theta_top_level_or_in_rope_parameters() -> None:
    new = {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}
    old = {"rope_theta": 5e5, "rope_scaling": None}
    assert rope_theta(new) == rope_theta(old) == 5e5
    assert rope_scaling(new) is None and rope_scaling(old) is None
    legacy = {"rope_theta": 1e4, "max_position_embeddings": 64}
    legacy["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    scaling = rope_scaling(legacy)
    assert scaling.factor == 4.0 and scaling.original_max_seq_len == 16 and scaling.truncate
    gpt_oss = {  # the gpt-oss-20b config.json: 4.x style, no rope_parameters
        "model_type": "gpt_oss",
        "vocab_size": 97,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 16,
        "num_local_experts": 4,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
        },
    }
    cfg = hf_model_config(gpt_oss)
    assert cfg.rope_theta == 150000 and cfg.rope_scaling.factor == 8.0
    assert cfg.layer_types == ("sliding", "full") and cfg.attn_sinks
    with pytest.raises(CheckpointError, match="rope_type='llama3' is not supported"):
        rope_scaling({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}})


@pytest.mark.parametrize(
    ("case", "change", "says"),
    [
        # the counts' values are ambiguous (4 heads, 4 groups): the names come from the architecture
        ("deepseek_v3", {"n_routed_experts": 6, "n_group": 4},
         "n_group (moekit's n_groups)=4 is invalid: must divide n_routed_experts (6)"),
        # was a bare ZeroDivisionError
        ("qwen2_moe", {"decoder_sparse_step": 0},
         "decoder_sparse_step=0 is invalid: must be a positive count"),
        # were read as full attention, whatever they said
        ("gpt_oss", {"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
         "'chunked_attention', 'full_attention'] is invalid: must give each of the "
         "num_hidden_layers=3 layers one of ('full_attention', 'sliding_attention')"),
        ("gpt_oss", {"layer_types": ["full_attention"]},
         "layer_types=['full_attention'] is invalid"),
    ],
)  # fmt: skip
def test_an_architectures_own_config_keys_are_named(case: str, change: dict, says: str) -> None:
    hf = hf_config(case).to_dict() | change
    with pytest.raises(CheckpointError, match=re.escape(says)):
        hf_model_config(hf)


def test_swish_is_silu_as_in_transformers(mixtral_dir: Path) -> None:
    hf = json.loads((mixtral_dir / "config.json").read_text())
    assert hf_model_config(hf | {"hidden_act": "swish"}) == hf_model_config(hf)
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not supported"):
        hf_model_config(hf | {"hidden_act": "gelu"})


def test_old_style_config_loads_the_same_model(mixtral_dir: Path, tmp_path: Path) -> None:
    folder = copy_of(mixtral_dir, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    theta = cfg.pop("rope_parameters")["rope_theta"]
    cfg |= {"rope_theta": theta, "num_experts": cfg.pop("num_local_experts")}  # an alias too
    (folder / "config.json").write_text(json.dumps(cfg))
    assert load_hf(folder).cfg == load_hf(mixtral_dir).cfg


def test_missing_config_keys_take_transformers_defaults() -> None:
    cfg = hf_model_config(
        {
            "model_type": "qwen3_moe",
            "vocab_size": 97,
            "hidden_size": 40,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "moe_intermediate_size": 8,
            "intermediate_size": 16,
        }
    )
    assert cfg.moe.n_experts == 128 and cfg.moe.top_k == 8 and not cfg.moe.normalize
    assert cfg.kv_heads == 4 and cfg.rope_theta == 1e4 and cfg.qk_norm == "head"


def test_architecture_that_cannot_express_the_model_names_the_fields(tmp_path: Path) -> None:
    cfg = hf_model_config(hf_config("qwen2_moe").to_dict())  # shared experts, qkv bias
    with pytest.raises(ValueError, match=r"mixtral cannot express.*attn_bias.*n_shared_experts"):
        save_hf(MoETransformer(cfg), tmp_path / "out", "mixtral")
    assert not (tmp_path / "out").exists()


def test_capacity_and_expert_choice_cannot_be_exported(tmp_path: Path) -> None:
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2, capacity_factor=1.0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, moe=moe)
    with pytest.raises(ValueError, match=r"moe\.capacity_factor=1\.0"):
        save_hf(MoETransformer(cfg), tmp_path / "out", "mixtral")


def test_nonzero_correction_bias_needs_an_architecture_that_has_one(tmp_path: Path) -> None:
    moe = MoEConfig(d_model=32, d_expert=16, n_experts=4, top_k=2)
    model = MoETransformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, moe=moe))
    model.moe_layers()[0].router.expert_bias.fill_(0.1)
    with pytest.raises(ValueError, match=r"no place for layers\.0\.ffn\.router\.expert_bias"):
        save_hf(model, tmp_path / "out", "mixtral")


def test_existing_directory_is_kept_unless_overwrite(mixtral_dir: Path, tmp_path: Path) -> None:
    model = load_hf(mixtral_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, out, "mixtral")
    # overwrite replaces a checkpoint only: it deleted any folder (a run, these notes)
    with pytest.raises(FileExistsError, match="is not a Hugging Face checkpoint"):
        save_hf(model, out, "mixtral", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    run = tmp_path / "run"
    shutil.copytree(out, run / "checkpoints" / "step-000001")
    (run / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="no checkpoints/"):
        save_hf(model, run, "mixtral", overwrite=True)
    (out / "notes.txt").unlink()
    save_hf(model, out, "mixtral")
    save_hf(model, out, "mixtral", overwrite=True, dtype="bfloat16")
    assert load_hf(out).embed.weight.dtype == torch.bfloat16


def test_failed_write_leaves_nothing_behind(mixtral_dir: Path, tmp_path: Path, monkeypatch):
    import moekit.interop.hf as hf_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_module, "write_shards", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(load_hf(mixtral_dir), tmp_path / "out", "mixtral")
    assert list(tmp_path.iterdir()) == []


def test_deepseek_layers_after_the_last_are_no_longer_skipped(tmp_path: Path) -> None:
    """A tensor of a layer the config does not declare (none past the last here: the case has
    num_nextn_predict_layers=0) is an error naming it, as for every other architecture; the MTP
    layers a config declares load into model.mtp (tests/test_interop_mtp.py)."""
    folder = save_hf_case("deepseek_v3", tmp_path / "ds")
    edit_weights(folder, lambda t: t.update({"model.layers.3.eh_proj.weight": torch.ones(40, 80)}))
    with pytest.raises(CheckpointError, match=r"unexpected: model\.layers\.3\.eh_proj\.weight"):
        load_hf(folder)


def test_a_head_width_not_given_is_the_rounded_down_quotient(mixtral_dir: Path) -> None:
    """A config.json without head_dim whose hidden_size the heads do not divide: the head width
    transformers computes (hidden_size // num_attention_heads, rounded down), not a refusal."""
    from moekit.interop.hf import hf_model_config, read_hf_config

    hf = read_hf_config(mixtral_dir)
    hf = {k: v for k, v in hf.items() if k != "head_dim"}
    hf |= {"num_attention_heads": 6, "num_key_value_heads": 2}
    assert hf_model_config(hf).head_dim == hf["hidden_size"] // 6


@pytest.mark.parametrize(("key", "value"), [("scoring_func", "softmax"), ("topk_method", "greedy")])
def test_deepseek_routing_is_written_and_another_is_refused(tmp_path: Path, key, value) -> None:
    """save_hf writes DeepSeek-V3's routing into config.json as its published configs do (readers
    other than transformers, llama.cpp's converter among them, take softmax scores without it);
    a config with another routing (DeepSeek-V2's softmax, its greedy top-k) is one error naming
    the key, not a model that routes otherwise."""
    ours = load_hf(save_hf_case("deepseek_v3", tmp_path / "ds"))  # (transformers writes neither)
    save_hf(ours, tmp_path / "ours", "deepseek_v3")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert (written["scoring_func"], written["topk_method"]) == ("sigmoid", "noaux_tc")
    with pytest.raises(CheckpointError, match=rf"config\.json: {key}='{value}': deepseek_v3"):
        hf_model_config({**written, key: value})
