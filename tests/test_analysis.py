"""Routing analysis: token classes, traces, and the report of `moekit analyze`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_model

from moekit.analysis.analyze import analyze
from moekit.analysis.report import favourites, top_domains
from moekit.analysis.token_classes import CLASSES, char_classes, token_classes
from moekit.analysis.trace import domain_of, label_tokens, record_routing
from moekit.cli import main
from moekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from moekit.data import Document, byte_tokenizer
from moekit.model import MoETransformer

SOURCE = 'def f(x):\n    # hi\n    return x + 1, "s"\n'


def names(classes: np.ndarray) -> str:
    return " ".join(CLASSES[c] for c in classes)


def test_char_classes_follow_tokenize():
    c = char_classes(SOURCE)
    assert names(c[:9]) == " ".join(["keyword"] * 3 + ["whitespace", "name", "operator", "name"]
                                    + ["operator"] * 2)  # fmt: skip
    assert names(c[14:18]) == " ".join(["comment"] * 4)
    assert names(c[-9:-1]) == "operator whitespace number operator whitespace" + " string" * 3


def test_text_that_is_not_python_is_other_after_the_failure():
    assert names(char_classes('x = """abc')[-3:]) == "other other other"


def test_a_bpe_token_takes_the_majority_class_of_its_characters():
    chars = np.array([CLASSES.index(n) for n in ["keyword"] * 3 + ["whitespace"]])
    assert names(token_classes(chars, [(0, 4), (3, 4), (0, 0)])) == "keyword whitespace other"


def test_domain_is_the_top_folder():
    assert domain_of("json/decoder.py") == "json"
    assert domain_of("os.py") == "(top level)"


def test_top_domains_merges_the_rare_ones(monkeypatch):
    monkeypatch.setattr("moekit.analysis.report.MAX_DOMAINS", 2)
    labels, kept = top_domains(np.array([0, 1, 1, 2, 2, 2]), ["a", "b", "c"])
    assert kept == ["c", "b", "(other)"]
    assert labels.tolist() == [2, 1, 1, 0, 0, 0]


def test_favourites_names_each_class_best_expert():
    spec = [[0.5, 0.0], [0.25, 0.0]]  # expert x class; the second class is empty
    assert favourites(spec, ["keyword", "name"], 0.25) == "keyword: expert 0 (2.0x)"


def tiny_model() -> MoETransformer:
    model = MoETransformer(ModelConfig.preset("tiny").replace(vocab_size=257))
    model.init_weights()
    return model.eval()


def test_trace_keeps_each_layer_top_k_in_token_order():
    docs = [Document("pkg/a.py", SOURCE), Document("b.py", SOURCE)]
    tokens = label_tokens(byte_tokenizer(), docs, 80)
    assert tokens.domains == ["pkg", "(top level)"] and len(tokens.token_ids) == 80
    model = tiny_model()
    trace = record_routing(model, tokens, seq_len=32, batch_size=2)
    moe = model.cfg.moe
    assert len(trace.ids) == len(model.cfg.moe_layer_indices)
    assert trace.ids[0].shape == (80, moe.top_k)
    assert trace.new_seq.nonzero().flatten().tolist() == [0, 32, 64]
    alone = model(torch.from_numpy(tokens.token_ids[32:64])[None]).aux[1].ids
    assert torch.equal(trace.ids[1][32:64], alone)
    assert 0 < trace.entropy[0] <= math.log(moe.n_experts) + 1e-6


def write_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    for name in ("pkg/a.py", "pkg/b.py", "c.py"):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(SOURCE * 20)
    return corpus


def fake_run(tmp_path: Path) -> Path:
    """A run directory with two checkpoints of a random tiny model, on a corpus of 3 files."""
    corpus = write_corpus(tmp_path)
    run = tmp_path / "run"
    data = DataConfig(source=str(corpus), tokenizer="bytes", val_fraction=0.5)
    cfg = RunConfig(
        model=ModelConfig.preset("tiny").replace(vocab_size=257),
        train=TrainConfig(data=data, seq_len=64),
    )
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(cfg.to_json())
    byte_tokenizer().save(str(run / "tokenizer.json"))
    for step in (2, 4):
        (run / f"checkpoints/step-{step:06d}").mkdir()
        save_model(tiny_model(), str(run / f"checkpoints/step-{step:06d}/model.safetensors"))
    return run


def test_analyze_writes_the_report_json_and_plots(tmp_path: Path):
    run = fake_run(tmp_path)
    report = analyze(run, n_tokens=300, seq_len=64)
    assert report == run / "analysis/report.md"
    data = json.loads((run / "analysis/analysis.json").read_text())
    assert len(data["layers"]) == 2 and data["meta"]["n_tokens"] == 300
    layer = data["layers"][0]
    assert sum(layer["load"]) == pytest.approx(1.0)
    n_experts = ModelConfig.preset("tiny").moe.n_experts
    assert len(layer["token_class"]) == n_experts and len(layer["token_class"][0]) == len(CLASSES)
    assert data["saturation"]["steps"] == [2, 4]
    assert [v[-1] for v in data["saturation"]["layers"]] == [1.0, 1.0]
    # step 2 holds another random model: its routing is not the final one's (chance: ~k/E)
    assert all(v[0] < 0.75 for v in data["saturation"]["layers"]), data["saturation"]
    for png in ("load", "repetition", "coactivation", "token_class", "domain", "saturation"):
        assert (run / f"analysis/{png}.png").stat().st_size > 1000
        assert f"({png}.png)" in report.read_text()


def test_analyze_cli_names_a_directory_that_is_not_a_model(tmp_path: Path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err


def test_analyze_reads_a_hugging_face_checkpoint_directory(tmp_path: Path):
    from moekit.interop import save_hf

    save_hf(tiny_model(), tmp_path / "hf", "mixtral", tokenizer=byte_tokenizer())
    corpus = write_corpus(tmp_path)
    report = analyze(
        tmp_path / "hf", data=str(corpus), n_tokens=200, seq_len=64, out_dir=tmp_path / "a"
    )
    data = json.loads((tmp_path / "a/analysis.json").read_text())
    assert report.is_file() and data["saturation"] is None and len(data["layers"]) == 2
