"""A user who trained with `moekit train` exports with `moekit convert --to-hf` and loads the
result in transformers: same logits, same tokenizer; `convert --from-hf` brings it back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.interop_cases import save_hf_case
from tests.run_cases import JSON_PACKAGE
from tokenizers import Tokenizer

from moekit.cli import main
from moekit.data import eos_id
from moekit.interop import load_hf
from moekit.train.sample import load_run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step `moekit train` run of the tiny preset on bytes of the json package."""
    root = tmp_path_factory.mktemp("train")
    args = [
        "train",
        "tiny",
        f"--out={root / 'run'}",
        "--train.steps=4",
        "--train.progress=false",
        "--train.tensorboard=false",
        f"--train.data.source={JSON_PACKAGE}",
        "--train.data.tokenizer=bytes",
        f"--train.data.cache_dir={root / 'cache'}",
    ]
    assert main(args) == 0
    return root / "run"


def test_trained_run_converts_and_transformers_computes_the_same_logits(run_dir, tmp_path):
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", str(run_dir), "--arch", "mixtral", "--out", str(out)]) == 0
    _, ours, _ = load_run(run_dir)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(
        out,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    text = "def dumps(obj, *, indent=None):\n    return"
    ids = Tokenizer.from_file(str(run_dir / "tokenizer.json")).encode(text).ids
    hf_ids = transformers.AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert hf_ids == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (ours(x).logits - theirs.eval()(x).logits).abs().max().item()
    assert diff <= 1e-5


def test_export_to_an_architecture_that_cannot_hold_it_is_one_line(run_dir, tmp_path, capsys):
    args = ["convert", "--to-hf", str(run_dir), "--arch", "qwen3_moe", "--out", str(tmp_path / "q")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "qwen3_moe cannot express this model" in err and "qk_norm=None" in err
    assert not (tmp_path / "q").exists()
    args[4], args[-1] = "qwen2_moe", str(tmp_path / "q2")  # a model without a shared expert
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "every Qwen2-MoE layer has a shared expert" in err and "d_shared" not in err
    assert not (tmp_path / "q2").exists()


def test_from_hf_writes_a_run_that_exports_the_same_weights(run_dir, tmp_path) -> None:
    hf, back = tmp_path / "hf", tmp_path / "run"
    assert main(["convert", "--to-hf", str(run_dir), "--arch", "mixtral", "--out", str(hf)]) == 0
    assert main(["convert", "--from-hf", str(hf), "--out", str(back)]) == 0
    _, original, _ = load_run(run_dir)
    _, imported, checkpoint = load_run(back)
    assert checkpoint.name == "step-000000" and (back / "tokenizer.json").is_file()
    a, b = original.state_dict(), imported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["generate", str(back), "--prompt=def f(", "--max_new_tokens=3"]) == 0


def test_a_converted_run_fine_tunes_with_its_own_tokenizer(run_dir, tmp_path) -> None:
    """`train --resume` on a `convert --from-hf` run trains from the imported weights and keeps
    the checkpoint's tokenizer.json as it came (no BPE is trained over it)."""
    hf, back = tmp_path / "hf", tmp_path / "run"
    assert main(["convert", "--to-hf", str(run_dir), "--arch", "mixtral", "--out", str(hf)]) == 0
    assert main(["convert", "--from-hf", str(hf), "--out", str(back)]) == 0
    tokenizer = (back / "tokenizer.json").read_bytes()
    args = ["train", "--resume", str(back), "--train.steps=2", "--train.progress=false",
            "--train.tensorboard=false", f"--train.data.source={JSON_PACKAGE}",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(args) == 0
    assert (back / "tokenizer.json").read_bytes() == tokenizer
    _, tuned, checkpoint = load_run(back)
    assert checkpoint.name == "step-000002"
    _, original, _ = load_run(run_dir)
    assert not torch.equal(tuned.embed.weight, original.embed.weight)  # it trained


def test_a_converted_run_fine_tunes_with_parts_frozen_resumed_or_as_a_new_run(
    run_dir, tmp_path, capsys
) -> None:
    """The README's fine-tuning, with --train.freeze: resuming the converted run (its step 0 has
    no optimizer state: the checkpoint's, for every parameter, was refused as "does not fit this
    run"), or a new run from its weights (--train.init_from; tokenizer "run" took the new run's
    folder, which has no tokenizer.json). Once a run has trained, its frozen parts stay."""
    hf, back = tmp_path / "hf", tmp_path / "run"
    assert main(["convert", "--to-hf", str(run_dir), "--arch", "mixtral", "--out", str(hf)]) == 0
    assert main(["convert", "--from-hf", str(hf), "--out", str(back)]) == 0
    _, imported, _ = load_run(back)
    common = ["--train.steps=2", "--train.progress=false", "--train.tensorboard=false",
              f"--train.data.source={JSON_PACKAGE}", f"--train.data.cache_dir={tmp_path / 'cache'}",
              "--train.freeze=experts"]  # fmt: skip
    new = tmp_path / "new"
    init = [str(back / "config.json"), f"--train.init_from={back}", f"--out={new}"]
    for args in (["--resume", str(back)], init):
        assert main(["train", *args, *common]) == 0
        _, tuned, checkpoint = load_run(new if args is init else back)
        assert checkpoint.name == "step-000002"
        trained = dict(tuned.named_parameters())
        for name, weight in imported.named_parameters():
            assert torch.equal(trained[name], weight) == (".experts." in name), name
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the chat files with it
        assert (new / name).read_bytes() == (back / name).read_bytes(), name
    capsys.readouterr()
    config = (back / "config.json").read_text()
    resume = ["train", "--resume", str(back), *common[1:-1], "--train.steps=4"]
    assert main([*resume, "--train.freeze=router"]) == 2
    err = capsys.readouterr().err
    assert "train.freeze=['router'] freezes other parts than" in err, err
    assert "(['experts']), whose optimizer state" in err, err
    assert f"--train.init_from={back}" in err
    assert (back / "config.json").read_text() == config  # nothing written


def test_a_converted_run_whose_end_token_is_not_moekits_generates_and_fine_tunes(
    run_dir, tmp_path
) -> None:
    """A checkpoint's own end-of-text token (Mixtral's </s> here) ends generation and joins
    documents in training."""
    hf, back = tmp_path / "hf", tmp_path / "run"
    assert main(["convert", "--to-hf", str(run_dir), "--arch", "mixtral", "--out", str(hf)]) == 0
    text = (hf / "tokenizer.json").read_text()
    (hf / "tokenizer.json").write_text(text.replace("<|endoftext|>", "</s>"))
    assert main(["convert", "--from-hf", str(hf), "--out", str(back)]) == 0
    tokenizer = Tokenizer.from_file(str(back / "tokenizer.json"))
    assert tokenizer.token_to_id("<|endoftext|>") is None and eos_id(tokenizer) == 256
    assert main(["generate", str(back), "--prompt=def f(", "--max_new_tokens=3"]) == 0
    args = ["train", "--resume", str(back), "--train.steps=2", "--train.progress=false",
            "--train.tensorboard=false", f"--train.data.source={JSON_PACKAGE}",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(args) == 0 and load_run(back)[2].name == "step-000002"


@pytest.mark.parametrize("case", ["mixtral", "deepseek_v3"])
def test_from_hf_keeps_a_vocabulary_too_small_for_a_bpe(case: str, tmp_path) -> None:
    """A valid checkpoint of 97 tokens converts: its run needs no BPE (issue 13)."""
    hf = save_hf_case(case, tmp_path / "hf")
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "run")]) == 0
    cfg, model, _ = load_run(tmp_path / "run")
    assert cfg.model.vocab_size == 97 and cfg.train.data.tokenizer == "run"
    want = load_hf(hf).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
