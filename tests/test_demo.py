"""`moekit demo` on a tiny run: an MoE and its dense twin side by side, compared, sampled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tests.run_cases import JSON_PACKAGE, tiny_run

from moekit.cli import main
from moekit.cli.demo import clear_previous_demo
from moekit.config import RunConfig, dense_twin
from moekit.train import train


def test_the_committed_demo_results_are_of_the_demo_preset() -> None:
    """benchmarks/results/demo (the README's figures) was run with the preset as it is now."""
    results = Path(__file__).resolve().parent.parent / "benchmarks/results/demo/comparison.json"
    preset = json.loads(RunConfig.preset("demo").to_json())
    # read as a run's config.json is (fields added since, e.g. model.mtp_depth, take defaults)
    stored = json.loads(RunConfig.from_dict(json.loads(results.read_text())["config"]).to_json())
    # nothing frozen: [] since train.freeze is a list, None in runs from before
    assert stored["train"].pop("freeze") in (None, []) and preset["train"].pop("freeze") == []
    assert stored == preset


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
            "--train.batch_size=4", "--train.seq_len=32", "--train.eval.batches=1",
            f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    for name in ("moe", "dense"):  # an earlier demo (its two runs' configs), with a file of its own
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text(RunConfig.preset("demo").to_json())
    (out / "stale.txt").write_text("from the last demo")
    assert main(["demo", "--out", str(out), "--max_new_tokens=8", *tiny]) == 0  # replaces it
    assert not (out / "stale.txt").exists()
    printed = capsys.readouterr().out
    figures = json.loads((out / "comparison.json").read_text())
    ratio = figures["comparison"]["moe"]["step_ratio"]
    reached = f"in {ratio:.2f}x the steps and" if ratio else "did not reach dense's final"
    assert reached in printed and "bits/byte" in printed and "least loaded" in printed
    for name in ("moe", "dense"):
        assert f"validation {figures['runs'][name]['final_val_loss']:.3f} nats/token" in printed
    assert f"moekit generate {out / 'moe'} --prompt='def main('" in printed
    report = (out / "report.md").read_text()
    assert (
        "| final validation loss (nats/token) |" in report and "## Sample (from the MoE)" in report
    )
    for name in ("loss.png", "expert_load.png", "moe/report.md", "dense/report.md"):
        assert (out / name).stat().st_size > 0, name
    clear_previous_demo(out)  # what a demo writes is what the next demo replaces
    assert not out.exists()


def test_demo_refuses_to_replace_what_is_not_a_demo(tmp_path: Path, capsys) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    run = tmp_path / "run"  # a run of the user's: a config.json, but not a demo's two runs
    train(tiny_run(tmp_path, steps=2), run)
    for folder in (tmp_path / "mine", run):
        assert main(["demo", "--out", str(folder)]) == 2
        assert "is not a demo of an MoE and its dense twin" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (run / "config.json").is_file() and list((run / "checkpoints").iterdir())


def test_demo_checks_the_device_before_it_clears_the_last_demo(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without cuda:7
    out = tmp_path / "demo"
    for name in ("moe", "dense"):  # an earlier demo's two runs: what clear_previous_demo removes
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text("{}")
    assert main(["demo", "--out", str(out), "--train.device=cuda:7"]) == 2
    assert "train.device='cuda:7' is not available here" in capsys.readouterr().err
    assert (out / "moe" / "config.json").is_file() and (out / "dense" / "config.json").is_file()


def test_demo_refuses_a_prompt_that_fills_the_context_before_training(
    tmp_path: Path, capsys
) -> None:
    """The sample's prompt was read after minutes of training, with the last demo gone."""
    out = tmp_path / "demo"
    for name in ("moe", "dense"):
        (out / name).mkdir(parents=True)
        (out / name / "config.json").write_text("{}")
    data = [f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(["demo", "--out", str(out), f"--prompt={'x' * 200}", *data]) == 2
    err = capsys.readouterr().err
    assert "--prompt is 200 tokens; the model's max_seq_len=128 leaves no room" in err, err
    assert (out / "moe" / "config.json").is_file() and not (out / "moe" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"activation": "gelu"}, "SwiGLU FFN without biases"),
        ({"capacity_factor": 1.25}, "exactly top_k experts per token"),
    ],
)
def test_a_dense_twin_of_another_compute_is_refused(change: dict, says: str) -> None:
    model = RunConfig.preset("demo").model
    with pytest.raises(ValueError, match=says):
        dense_twin(model.replace(moe=model.moe.replace(**change)))
    with pytest.raises(ValueError, match="dense layers have d_ff=512"):
        dense_twin(model.replace(first_dense=1, d_ff=512))
    shared = model.replace(moe=model.moe.replace(n_shared_experts=1, d_shared=64))
    assert dense_twin(shared).d_ff == 2 * 128 + 64
