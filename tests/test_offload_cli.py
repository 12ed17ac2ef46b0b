"""`moekit generate --offload.budget=N`, `moekit trace` and `moekit cache-sim` on a tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.run_cases import JSON_PACKAGE

from moekit.cli import main
from moekit.inference.trace import load_trace


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("offload_cli")
    args = ["train", "tiny", f"--out={tmp / 'run'}", "--train.steps=1", "--train.progress=false",
            f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp / 'cache'}"]  # fmt: skip
    assert main(args) == 0
    return tmp / "run"


def generate(run: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["generate", str(run), "--prompt=def f(", "--max_new_tokens=6", "--temperature=0",
                 *extra])  # fmt: skip
    out = capsys.readouterr()
    return code, out.out, out.err


def test_offloaded_generate_prints_the_same_text_and_its_statistics(run: Path, capsys) -> None:
    capsys.readouterr()
    _, plain, _ = generate(run, capsys)
    code, text, _ = generate(run, capsys, "--offload.budget=3", "--offload.prefetch=true")
    assert code == 0
    assert text.startswith(plain.rstrip("\n"))
    assert "expert cache: 3 experts, hit rate" in text and "prefetch accuracy" in text
    # at the minimum budget (top_k = 2) prefetch would only waste reads: it stands down, once
    code, text, err = generate(run, capsys, "--offload.budget=2", "--offload.prefetch=true")
    assert code == 0 and err.count("note: prefetch stands down") == 1 and "Warning" not in err
    assert text.startswith(plain.rstrip("\n")) and "prefetch accuracy" not in text


def test_budget_below_minimum_fails_before_generating(run: Path, capsys) -> None:
    code, out, err = generate(run, capsys, "--offload.budget=1")
    assert code == 2 and out == "" and "minimum is top_k=2" in err


def test_trace_then_cache_sim_then_static(run: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\nimport json\n")
    out = tmp_path / "run.trace"
    assert main(["trace", str(run), "--prompts", str(prompts), "--out", str(out),
                 "--max_new_tokens=4"]) == 0  # fmt: skip
    assert load_trace(out).ids.shape[1:] == (2, 2)
    capsys.readouterr()
    assert main(["cache-sim", str(out), "--budget=50%,4"]) == 0
    printed = capsys.readouterr()
    assert "belady" in printed.out and printed.out.count("%") >= 4 * 3
    assert "note" not in printed.err  # a trace of this version: the figures are the model's
    code, _, _ = generate(run, capsys, "--offload.budget=4", "--offload.policy=static",
                          f"--offload.trace={out}")  # fmt: skip
    assert code == 0
