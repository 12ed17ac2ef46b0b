"""DeepSeek-V3's multi-token-prediction layer in Hugging Face checkpoints: load_hf reads it,
save_hf writes it back bit for bit (with the layer's copies of the embedding and head), the main
logits still equal transformers' and the MTP logits equal transformers' generic `MtpModel` on the
same weights; unknown, missing and unequal tensors are errors naming them; mtp=False drops the
layer with one warning."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file
from tests.interop_cases import hf_config, load_transformers, randomize, tokens

from moekit import MoETransformer
from moekit.interop import CheckpointError, hf_model_config, load_hf, save_hf

CASE = "deepseek_v3"
N = 3  # the case's num_hidden_layers: the MTP layer is model.layers.3


def mtp_model() -> MoETransformer:
    config = hf_config(CASE)
    config.num_nextn_predict_layers = 1
    cfg = hf_model_config(config.to_dict())
    assert cfg.mtp_depth == 1
    return randomize(MoETransformer(cfg), seed=5).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[MoETransformer, dict[str, Path]]:
    root = tmp_path_factory.mktemp("mtp")
    model = mtp_model()
    dirs = {layout: root / layout for layout in ("per_expert", "fused")}
    for layout, folder in dirs.items():
        save_hf(model, folder, CASE, layout=layout)
    return model, dirs


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_save_writes_the_mtp_layer_as_deepseek_v3_stores_it(saved) -> None:
    _, dirs = saved
    files = tensors(dirs["per_expert"])
    assert (
        json.loads((dirs["per_expert"] / "config.json").read_text())["num_nextn_predict_layers"]
        == 1
    )
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head",
                 "embed_tokens", "input_layernorm", "self_attn.kv_a_proj_with_mqa", "mlp.gate",
                 "mlp.experts.7.down_proj", "mlp.shared_experts.up_proj"):  # fmt: skip
        assert f"model.layers.{N}.{name}.weight" in files
    assert files[f"model.layers.{N}.eh_proj.weight"].shape == (40, 80)
    assert torch.equal(
        files[f"model.layers.{N}.embed_tokens.weight"], files["model.embed_tokens.weight"]
    )
    assert torch.equal(files[f"model.layers.{N}.shared_head.head.weight"], files["lm_head.weight"])
    assert not any(k.startswith(f"model.layers.{N + 1}.") for k in files)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_round_trip_keeps_every_tensor_bit_equal(saved, layout: str, tmp_path) -> None:
    model, dirs = saved
    loaded = load_hf(dirs[layout])
    assert loaded.cfg == model.cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    save_hf(loaded, tmp_path / "again", CASE, layout=layout)
    first, second = tensors(dirs[layout]), tensors(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1


def test_main_and_mtp_logits_equal_transformers(saved) -> None:
    """Main logits: DeepseekV3ForCausalLM (which skips the MTP layer). MTP logits: transformers'
    generic MtpModel built on that main model (embedding first, the main model's last hidden
    state after its final norm, shared embedding and head), its layer filled from the fused
    checkpoint, whose keys are transformers' module names."""
    from transformers.modeling_layers import MtpModel

    model, dirs = saved
    theirs, _ = load_transformers(CASE, dirs["fused"])
    files = tensors(dirs["fused"])
    mtp = MtpModel(theirs, 1).eval()
    own = {"enorm", "hnorm", "eh_proj"}
    state = {}
    for key, value in files.items():
        if key.startswith(f"model.layers.{N}."):
            rest = key.removeprefix(f"model.layers.{N}.")
            if rest.startswith(("embed_tokens.", "shared_head.head.")):
                continue  # shared with the main model
            if rest == "shared_head.norm.weight":
                state["layers.0.post_norm.weight"] = value
            elif rest.split(".")[0] in own:
                state[f"layers.0.{rest}"] = value
            else:
                state[f"layers.0.mtp_block.{rest}"] = value
    missing, unexpected = mtp.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("embed_tokens", "shared_head")) for k in missing)
    x = tokens(seed=6)
    S = x.shape[1]
    with torch.no_grad():
        ours = model(x, mtp=True)
        main = theirs(x, output_hidden_states=True)
        h = mtp.forward_layer(0, main.hidden_states[-1][:, : S - 1],
                              torch.arange(1, S)[None], None, input_ids=x[:, 1:])  # fmt: skip
        their_mtp = mtp._project_to_logits(h)
    assert (ours.logits - main.logits).abs().max() <= 1e-5
    assert (ours.mtp_logits[0][:, : S - 1] - their_mtp).abs().max() <= 1e-5


def rewrite(source: Path, target: Path, change) -> Path:
    """A copy of the checkpoint at `source` whose tensors `change` edits in place."""
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    files = tensors(source)
    change(files)
    save_file(files, str(target / "model.safetensors"))
    return target


def test_unequal_copy_of_the_embedding_is_refused_naming_both(saved, tmp_path) -> None:
    def perturb(files):
        files[f"model.layers.{N}.shared_head.head.weight"][3, 1] += 1.0

    folder = rewrite(saved[1]["per_expert"], tmp_path / "bad", perturb)
    with pytest.raises(
        CheckpointError,
        match=rf"model\.layers\.{N}\.shared_head\.head\.weight differs from lm_head\.weight",
    ):
        load_hf(folder)


def test_unknown_and_missing_tensors_are_errors_naming_them(saved, tmp_path) -> None:
    def add(files):
        files["model.layers.9.whatever.weight"] = torch.zeros(2)

    def remove(files):
        del files[f"model.layers.{N}.hnorm.weight"]

    with pytest.raises(CheckpointError, match=r"1 unexpected: model\.layers\.9\.whatever\.weight"):
        load_hf(rewrite(saved[1]["per_expert"], tmp_path / "extra", add))
    with pytest.raises(CheckpointError, match=rf"1 missing: model\.layers\.{N}\.hnorm\.weight"):
        load_hf(rewrite(saved[1]["per_expert"], tmp_path / "short", remove))


def test_mtp_false_drops_the_layer_with_one_warning_naming_it(saved) -> None:
    model, dirs = saved
    with pytest.warns(UserWarning) as caught:
        plain = load_hf(dirs["per_expert"], mtp=False)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert f"model.layers.{N}" in message and "mtp=True" in message
    assert plain.cfg.mtp_depth == 0 and not list(plain.mtp.parameters())
    x = tokens(seed=7)
    with torch.no_grad():
        assert torch.equal(plain(x).logits, model(x).logits)


def test_a_config_declaring_mtp_without_its_tensors_loads_without_mtp(saved, tmp_path) -> None:
    """What transformers' save_pretrained writes: num_nextn_predict_layers=1, no layer."""

    def strip(files):
        for key in [k for k in files if k.startswith(f"model.layers.{N}.")]:
            del files[key]

    folder = rewrite(saved[1]["per_expert"], tmp_path / "none", strip)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_hf(folder).cfg.mtp_depth == 0


def test_mtp_on_an_architecture_without_an_mtp_layer_is_refused_on_save(tmp_path) -> None:
    from moekit import ModelConfig

    model = MoETransformer(ModelConfig.preset("tiny").replace(mtp_depth=1))
    with pytest.raises(
        ValueError, match=r"mixtral cannot express this model: mtp_depth=1 \(mixtral gives 0\)"
    ):
        save_hf(model, tmp_path / "out", "mixtral")
    assert not (tmp_path / "out").exists()
