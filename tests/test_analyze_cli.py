"""`moekit analyze`'s seq_len against the model's context: refused above max_seq_len before the
model is read (it was cut silently while analyze_config.json kept the number given); by default
256, or max_seq_len where shorter, and the number traced is the one saved."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from moekit import ModelConfig, MoETransformer
from moekit.analysis.analyze import analyze
from moekit.cli import main
from moekit.config import AnalyzeConfig
from moekit.data import byte_tokenizer
from moekit.interop.convert import hf_run_config
from moekit.train.checkpoint import write_new_run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny model whose context (64) is shorter than analyze's default seq_len, as a run."""
    work = tmp_path_factory.mktemp("analyze_cli")
    cfg = ModelConfig.preset("tiny").replace(vocab_size=257, max_seq_len=64)
    byte_tokenizer().save(str(work / "tokenizer.json"))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    return write_new_run(work / "run", hf_run_config(cfg), model, work / "tokenizer.json")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    (tmp_path / "corpus/pkg").mkdir(parents=True)
    for name in ("pkg/a.py", "pkg/b.py", "c.py"):
        (tmp_path / "corpus" / name).write_text("def f(x):\n    return x + 1\n" * 40)
    return tmp_path / "corpus"


def test_a_seq_len_above_the_models_context_is_refused_first(run, tmp_path, capsys) -> None:
    out = tmp_path / "a"
    with mock.patch("moekit.cli.analyze.analyze", side_effect=AssertionError("analyzed")):
        assert main(["analyze", str(run), "--seq_len=1000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "moekit analyze: error: seq_len=1000 is invalid: must be at most the model's max_seq_len "
        "(64); give seq_len=64 or less\n"
    )
    assert not out.exists()
    with pytest.raises(ValueError, match=r"seq_len=65 is invalid: must be at most the model's"):
        analyze(run, seq_len=65, out_dir=out)
    assert not out.exists()


@pytest.mark.parametrize(("given", "traced"), [([], 64), (["--seq_len=32"], 32)])
def test_the_seq_len_traced_is_the_one_saved(run, corpus, tmp_path, given, traced) -> None:
    out = tmp_path / "a"
    args = ["analyze", str(run), f"--data={corpus}", "--tokens=200", "--out", str(out), *given]
    assert main(args) == 0
    saved = AnalyzeConfig.from_json((out / "analyze_config.json").read_text())
    assert saved == AnalyzeConfig(data=str(corpus), tokens=200, seq_len=traced)
    assert json.loads((out / "analysis.json").read_text())["meta"]["seq_len"] == traced


def test_fewer_held_out_tokens_than_asked_is_a_note(run, corpus, tmp_path, capsys) -> None:
    """Only report.md had said the validation split was shorter than --tokens."""
    args = [
        "analyze",
        str(run),
        f"--data={corpus}",
        "--tokens=1000000",
        "--out",
        str(tmp_path / "a"),
    ]
    assert main(args) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "fewer than the 1,000,000 asked: all of them are traced" in notes[0]
