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


@pytest.mark.parametrize(
    ("settings", "said"),
    [
        (["--offload.trace=nope.trace"], "--offload.trace=nope.trace needs --offload.budget: "),
        (["--offload.policy=static"], "--offload.policy=static needs --offload.budget: "),
        (["--offload.prefetch=true"], "--offload.prefetch=true needs --offload.budget: "),
        (["--offload.policy=lfu", "--offload.prefetch=true"],
         "--offload.policy=lfu and --offload.prefetch=true need --offload.budget: "),
        (["--offload.budget=4", "--offload.policy=static"],
         "--offload.policy=static keeps the most used experts of a routing trace: add "
         "--offload.trace=TRACE"),
        (["--offload.budget=4", "--offload.trace=nope.trace"],
         "--offload.trace=nope.trace is read by --offload.policy=static alone"),
    ],
)  # fmt: skip
def test_offload_settings_that_would_do_nothing_are_refused_first(
    run: Path, capsys, settings: list[str], said: str
) -> None:
    """Without a budget every expert stays in memory: a cache's policy, prefetch or trace would
    be ignored (they were, silently); a static cache needs a trace, and only it reads one."""
    code, out, err = generate(run, capsys, *settings)
    assert code == 2 and out == "" and "resolved config" not in err  # before anything is read
    assert err.startswith(f"moekit generate: error: {said}") and err.count("\n") == 1


def test_a_trace_of_another_model_names_the_differences_and_what_to_do(
    run: Path, tmp_path: Path, capsys
) -> None:
    import torch

    from moekit import MoETransformer
    from moekit.inference.trace import TraceRecorder, save_trace
    from moekit.loading import read_config
    from moekit.model.generation import generate as generate_ids

    cfg = read_config(run).model
    other = MoETransformer(cfg.replace(moe=cfg.moe.replace(n_experts=cfg.moe.n_experts + 2)))
    with TraceRecorder(other.eval()) as recorder:
        generate_ids(other, torch.tensor([[1, 2, 3]]), 2)
    save_trace(recorder.trace(), tmp_path / "other.trace")
    code, out, err = generate(run, capsys, "--offload.budget=4", "--offload.policy=static",
                              f"--offload.trace={tmp_path / 'other.trace'}")  # fmt: skip
    n = cfg.moe.n_experts
    assert code == 2 and out == ""
    assert (
        f"recorded from another model (the trace's n_experts={n + 2}; this model's n_experts={n}): "
        "record a trace of this model with `moekit trace" in err
    )
    # shapes alike, another config: the config hash is the difference named
    same_shape = MoETransformer(cfg.replace(rope_theta=cfg.rope_theta * 2)).eval()
    with TraceRecorder(same_shape) as recorder:
        generate_ids(same_shape, torch.tensor([[1, 2, 3]]), 2)
    save_trace(recorder.trace(), tmp_path / "same.trace")
    code, _, err = generate(run, capsys, "--offload.budget=4", "--offload.policy=static",
                            f"--offload.trace={tmp_path / 'same.trace'}")  # fmt: skip
    assert code == 2 and "the same expert shapes, another config: the trace's config_hash=" in err
