"""`moekit.load`: a run directory, one of its checkpoints and a Hugging Face directory, alike."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

import moekit
from moekit import MoETransformer
from moekit.cli import main
from moekit.config import ModelConfig, OffloadConfig, TrainConfig
from moekit.data import byte_tokenizer
from moekit.inference.offloaded_experts import OffloadedExperts
from moekit.interop import save_hf
from moekit.interop.convert import hf_run_config
from moekit.loading import load
from moekit.model.generation import generate
from moekit.train.checkpoint import TrainerState, write_new_run


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[MoETransformer, Path, Path]:
    """A tiny model as a run directory (step 0) and as a Mixtral checkpoint, with a tokenizer."""
    work = tmp_path_factory.mktemp("loading")
    cfg = moekit.ModelConfig.preset("tiny").replace(vocab_size=257)
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    byte_tokenizer().save(str(work / "tokenizer.json"))
    run = write_new_run(work / "run", hf_run_config(cfg), model, work / "tokenizer.json")
    hf = save_hf(model, work / "hf", "mixtral", tokenizer=work / "tokenizer.json")
    return model, run, hf


def same_weights(a: MoETransformer, b: MoETransformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_and_its_checkpoint_load_the_same_model(saved) -> None:
    model, run, _ = saved
    for path in (run, run / "checkpoints/step-000000"):
        loaded = load(path)
        assert same_weights(loaded.model, model) and not loaded.model.training
        assert loaded.config == hf_run_config(model.cfg)  # as written
        assert loaded.checkpoints == [run / "checkpoints/step-000000"]
        assert loaded.tokenizer.get_vocab_size() == byte_tokenizer().get_vocab_size()


def test_a_hugging_face_directory_loads_with_the_config_convert_writes(saved) -> None:
    model, _, hf = saved
    loaded = load(hf)
    assert same_weights(loaded.model, model) and loaded.checkpoints == []
    assert loaded.config == hf_run_config(loaded.model.cfg)  # what convert --from-hf writes
    assert loaded.config.train.data.tokenizer == "run"
    assert loaded.config.train.seq_len == min(TrainConfig().seq_len, model.cfg.max_seq_len)


def test_dtype_converts_the_weights_and_keeps_the_correction_biases(saved) -> None:
    _, run, hf = saved
    for path in (run, hf):
        model = load(path, dtype="bfloat16").model
        assert model.embed.weight.dtype == torch.bfloat16
        assert model.moe_layers()[0].router.expert_bias.dtype == torch.float32


def _copy_of(folder: Path, to: Path, *names: str) -> Path:
    """A new folder `to` holding copies of `folder`'s files `names`."""
    to.mkdir()
    for name in names:
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def test_a_missing_tokenizer_is_an_error_unless_not_required(saved, tmp_path) -> None:
    bare = _copy_of(saved[2], tmp_path / "hf", "config.json", "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json does not exist"):
        load(bare)
    assert load(bare, require_tokenizer=False).tokenizer is None


def test_a_folder_that_is_neither_says_so(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a run directory"):
        load(tmp_path)


def test_moekit_load_is_imported_on_first_use() -> None:
    assert moekit.load is load
    code = "import sys, moekit; print(sorted(m for m in sys.modules if 'loading' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_run_before_its_first_checkpoint_says_so(saved, tmp_path) -> None:
    _, run, _ = saved
    (tmp_path / "config.json").write_bytes((run / "config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        load(tmp_path)


def test_experts_offloaded_under_a_budget_generate_the_tokens_of_the_resident_model(saved) -> None:
    """load(..., experts=budget) leaves the routed experts in the checkpoint file behind a cache
    of that budget (a count, a fraction, bytes or an OffloadConfig) and generates the same
    greedy tokens as every expert in memory: the prefill through the grouped experts, the
    decoding steps through the selected ones."""
    model, run, _ = saved
    moe = model.cfg.moe
    n_experts = len(model.moe_layers()) * moe.n_experts
    expert_bytes = (2 * moe.d_expert * moe.d_model + moe.d_model * moe.d_expert) * 4  # float32
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.manual_seed(1))
    expected = generate(model, prompt, 8)
    budgets = [
        (moe.top_k, moe.top_k),  # the least that runs a layer
        ("50%", n_experts // 2),
        (f"{3 * expert_bytes}B", 3),
        (OffloadConfig(budget="0.25", policy="lfu", prefetch=True), n_experts // 4),
    ]
    for budget, capacity in budgets:
        loaded = load(run, experts=budget)
        assert loaded.offload is not None and loaded.offload.cache.capacity == capacity
        layers = loaded.model.moe_layers()
        assert all(isinstance(layer.experts, OffloadedExperts) for layer in layers)
        assert loaded.checkpoints == [run / "checkpoints/step-000000"] and loaded.tokenizer
        try:
            assert torch.equal(generate(loaded.model, prompt, 8), expected), budget
            assert loaded.offload.stats()["misses"] > 0
        finally:
            loaded.offload.close()


def test_experts_none_keeps_every_expert_in_memory(saved) -> None:
    model, run, _ = saved
    for experts in (None, OffloadConfig(budget=None)):
        loaded = load(run, experts=experts)
        assert loaded.offload is None and same_weights(loaded.model, model)


@pytest.mark.parametrize(
    ("experts", "dtype", "message"),
    [
        (1, None, r"expert budget 1 holds 1 experts; the minimum is top_k=2"),
        ("lots", None, r"expert budget 'lots' is invalid"),
        (True, None, r"experts=True is invalid"),
        ("50%", "bfloat16", r"dtype='bfloat16' with experts='50%'"),
    ],
)
def test_a_bad_expert_budget_is_one_clear_error(saved, experts, dtype, message) -> None:
    _, run, _ = saved
    with pytest.raises(ValueError, match=message):
        load(run, experts=experts, dtype=dtype)


def test_a_hugging_face_directory_is_not_offloaded_but_says_how(saved) -> None:
    _, _, hf = saved
    with pytest.raises(ValueError, match=r"convert it first \(moekit convert --from-hf"):
        load(hf, experts="50%")


def test_load_weights_streams_the_checkpoint_and_names_a_mismatch(tmp_path: Path) -> None:
    """`load_weights` checks names and shapes from the file's header, then streams every tensor
    into place; a tied embedding stored once loads into both names."""
    from moekit.train.checkpoint import load_weights, save_checkpoint

    cfg = ModelConfig.preset("tiny").replace(tie_embeddings=True)
    model = MoETransformer(cfg)
    folder = tmp_path / "run"
    state = TrainerState(3, 0, sampler={}, torch_rng=torch.get_rng_state())
    checkpoint = save_checkpoint(folder, model.state_dict(), {"state": {}, "param_groups": []},
                                 state, keep=1)  # fmt: skip
    fresh = MoETransformer(cfg)
    load_weights(checkpoint, fresh)
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
    wider = MoETransformer(cfg.replace(vocab_size=300))
    with pytest.raises(ValueError, match=r"size mismatch for embed\.weight: .*restore the config"):
        load_weights(checkpoint, wider)
    untied = MoETransformer(cfg.replace(tie_embeddings=False))
    with pytest.raises(ValueError, match=r"1 missing: lm_head\.weight"):
        load_weights(checkpoint, untied)


def test_a_hugging_face_config_without_weights_is_named_as_one(saved, tmp_path, capsys) -> None:
    """config.json in transformers' form with no weights beside it is a Hugging Face checkpoint
    missing its weights, not a run whose config has unknown fields."""
    bare = _copy_of(saved[2], tmp_path / "hf", "config.json", "tokenizer.json")
    with pytest.raises(ValueError, match=r"has neither model\.safetensors nor"):
        load(bare)
    assert main(["generate", str(bare), "--prompt=x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"moekit generate: error: {bare} has neither model.safetensors nor "
        "model.safetensors.index.json"
    )


def test_a_file_inside_a_model_folder_says_to_give_the_folder(saved, tmp_path, capsys) -> None:
    _, run, hf = saved
    step = run / "checkpoints/step-000000"
    for path, folder in ((run / "config.json", run), (hf / "config.json", hf),
                         (step / "model.safetensors", step)):  # fmt: skip
        with pytest.raises(ValueError, match=f"is a file: give the folder that holds it "
                           rf"\({re.escape(str(folder))}\)"):  # fmt: skip
            load(path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.txt is a file: give a run directory"):
        load(tmp_path / "notes.txt")
    assert main(["generate", str(run / "config.json")]) == 2
    assert f"give the folder that holds it ({run})" in capsys.readouterr().err


def test_generate_names_an_offload_budget_on_a_hugging_face_directory_as_typed(
    saved, capsys
) -> None:
    _, _, hf = saved
    with mock.patch("moekit.cli.generate.load", side_effect=AssertionError("loaded")):
        assert main(["generate", str(hf), "--offload.budget=50%"]) == 2  # before the model
    err = capsys.readouterr().err
    assert f"--offload.budget=50% offloads the experts of a run's checkpoint, and {hf} is a " in err
    assert "then moekit generate RUN_DIR --offload.budget=50%" in err
    assert "OffloadConfig(" not in err and "resolved config" not in err  # found first
    with pytest.raises(ValueError, match=r"an expert budget \('50%'\)") as raised:
        load(hf, experts=OffloadConfig(budget="50%"))
    assert "OffloadConfig(" not in str(raised.value)
