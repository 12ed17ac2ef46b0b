"""`moekit experiment`: every arm is a valid config; arms train and the report compares them."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest

from moekit.cli import main
from moekit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from moekit.experiments.arms import EXPERIMENTS, Experiment, moe_vs_dense
from moekit.experiments.runner import arm_figures, run_experiment, verdict
from moekit.overrides import apply_overrides


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_arm_is_a_valid_config_with_the_paper_sizes(name: str):
    base = RunConfig.preset("tiny")
    arms = dict(EXPERIMENTS[name].arms(base))
    cfgs = {arm: apply_overrides(base, ov) for arm, ov in arms.items()}
    assert len(cfgs) >= 4
    good, bad = EXPERIMENTS[name].better
    assert good in cfgs and bad in cfgs


def test_moe_vs_dense_keeps_the_active_width():
    base = RunConfig.preset("tiny")  # 8 experts of 64, top-2: active width 128
    cfgs = {arm: apply_overrides(base, ov).model for arm, ov in moe_vs_dense(base)}
    assert cfgs["dense"].moe is None and cfgs["dense"].d_ff == 128
    assert cfgs["hash"].moe.router == "hash"
    for arm in ("hash", "switch-top1", "top2", "fine-grained+shared"):
        moe = cfgs[arm].moe
        assert moe.top_k * moe.d_expert + moe.n_shared_experts * (moe.d_shared or 0) == 128


def test_arm_figures_from_metrics_records():
    layer = {"max_vio": 0.5, "dropped_fraction": 0.1, "z_loss": 4.0}
    records = [
        {"kind": "train", "step": 1, "lm_loss": 2.0, "tokens_per_s": 10.0, "layers": [layer]},
        {"kind": "train", "step": 2, "lm_loss": 3.5, "tokens_per_s": 30.0, "layers": [layer]},
        {"kind": "eval", "step": 2, "val_loss": 1.5},
    ]
    fig = arm_figures(records)
    assert (fig["val_loss"], fig["train_lm_loss"], fig["spikes"]) == (1.5, 3.5, 1)
    assert (fig["tokens_per_s"], fig["max_vio"], fig["dropped_fraction"]) == (20.0, 0.5, 0.1)
    assert math.isnan(arm_figures([])["val_loss"])


def test_verdict_reports_paired_differences_and_a_contrary_direction():
    exp = Experiment("x", "a beats b", lambda base: [], better=("a", "b"))
    results = {
        "a": [{"val_loss": 2.0}, {"val_loss": 2.0}],
        "b": [{"val_loss": 1.0}, {"val_loss": 1.5}],
    }
    text = verdict(exp, results)
    assert "= -0.75 (per seed: -1, -0.5)" in text and "differs from" in text


def test_an_experiment_trains_its_arms_and_writes_the_report(tmp_path: Path, monkeypatch):
    source = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    data = DataConfig(source=source, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    t = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, log_every=1,
                    progress=False, tensorboard=False, data=data,
                    eval=EvalConfig(every=2, batches=1))  # fmt: skip
    base = RunConfig(model=ModelConfig.preset("tiny").replace(vocab_size=257), train=t)
    two_arms = Experiment("moe-vs-dense", "MoE beats dense", lambda b: moe_vs_dense(b)[:2],
                          better=("hash", "dense"))  # fmt: skip
    monkeypatch.setitem(EXPERIMENTS, "moe-vs-dense", two_arms)
    report = run_experiment("moe-vs-dense", base, tmp_path / "exp").read_text()
    assert "| dense |" in report and "| hash |" in report
    assert "Measured: val_loss(dense) - val_loss(hash)" in report
    assert (tmp_path / "exp/dense/seed-0/metrics.jsonl").is_file()
    results = json.loads((tmp_path / "exp/results.json").read_text())
    assert math.isnan(results["dense"][0]["logit_rms"])  # no router
    assert results["hash"][0]["logit_rms"] == pytest.approx(math.log(8))  # zero logits, E = 8
    assert "Base: 2 steps" in report and "(loss.png)" in report
    assert (tmp_path / "exp/loss.png").stat().st_size > 1000


def test_experiment_cli_refuses_an_unknown_name(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
