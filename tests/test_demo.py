"""`moekit demo` on a tiny run: an MoE and its dense twin side by side, compared, sampled."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.run_cases import JSON_PACKAGE

from moekit.cli import main
from moekit.config import RunConfig, dense_twin


def test_the_dense_twin_has_the_moe_active_width() -> None:
    cfg = RunConfig.preset("demo")
    twin = dense_twin(cfg.model)
    assert twin.moe is None and twin.d_ff == cfg.model.moe.active_width == 256
    with pytest.raises(ValueError, match="needs an MoE model"):
        dense_twin(twin)


@pytest.mark.slow
def test_demo_trains_both_compares_and_reports(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    tiny = ["--train.steps=12", "--train.eval.every=4", "--train.log_every=2",
            f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(["demo", "--out", str(out), "--max-new-tokens", "8", *tiny]) == 0
    printed = capsys.readouterr().out
    assert "the training time" in printed and "bits/byte" in printed and "least loaded" in printed
    assert f"moekit generate {out / 'moe'}" in printed
    report = (out / "report.md").read_text()
    assert (
        "| final validation loss (nats/token) |" in report and "## Sample (from the MoE)" in report
    )
    for name in ("loss.png", "expert_load.png", "moe/report.md", "dense/report.md"):
        assert (out / name).stat().st_size > 0, name
    assert main(["demo", "--out", str(out), "--max-new-tokens", "8", *tiny]) == 0  # replaces it


def test_demo_refuses_to_replace_what_is_not_a_demo(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path / "mine")]) == 2
    assert "is not a moekit demo" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
