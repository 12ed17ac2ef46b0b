"""`moekit experiment`: every arm is a valid config; arms train and the report compares them."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from moekit.experiments.arms import EXPERIMENTS, Experiment, moe_vs_dense
from moekit.experiments.runner import (
    add_loss_at_equal_time,
    arm_figures,
    experiment_base,
    run_experiment,
    verdict,
    write_report,
)
from moekit.overrides import apply_overrides


@pytest.mark.parametrize("preset", ["tiny", "experiment", "small"])
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_every_arm_is_a_valid_config_with_the_paper_sizes(name: str, preset: str):
    base = RunConfig.preset(preset)
    arms = dict(EXPERIMENTS[name].arms(base))
    cfgs = {arm: apply_overrides(base, ov) for arm, ov in arms.items()}
    assert len(cfgs) >= 3
    for _, good, bad in EXPERIMENTS[name].checks:
        assert good in cfgs and bad in cfgs


def test_moe_vs_dense_keeps_the_active_width():
    base = RunConfig.preset("tiny")
    active = base.model.moe.top_k * base.model.moe.d_expert  # tiny: top-2 of 40, 80
    cfgs = {arm: apply_overrides(base, ov).model for arm, ov in moe_vs_dense(base)}
    assert cfgs["dense"].moe is None and cfgs["dense"].d_ff == active
    assert cfgs["hash"].moe.router == "hash"
    for arm in ("hash", "switch-top1", "top2", "fine-grained+shared"):
        moe = cfgs[arm].moe
        assert moe.top_k * moe.d_expert + moe.n_shared_experts * (moe.d_shared or 0) == active


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_a_learned_top1_router_is_not_renormalised(name: str):
    """Renormalised top-1 weighs every token's expert 1: the router would get no gradient from
    the language-model loss."""
    base = RunConfig.preset("experiment")
    for _, overrides in EXPERIMENTS[name].arms(base):
        moe = apply_overrides(base, overrides).model.moe
        if moe is not None and moe.top_k == 1 and moe.router != "hash":
            assert not moe.normalize


def test_arm_figures_from_metrics_records():
    layer = {"max_vio": 0.5, "dropped_fraction": 0.1, "z_loss": 4.0}
    records = [
        {"kind": "train", "step": 1, "lm_loss": 2.0, "tokens_per_s": 10.0, "seconds": 1.0,
         "layers": [layer]},
        {"kind": "train", "step": 2, "lm_loss": 3.5, "tokens_per_s": 30.0, "seconds": 2.0,
         "layers": [layer, layer | {"max_vio": 0.7}]},
        {"kind": "eval", "step": 2, "val_loss": 1.5},
    ]  # fmt: skip
    fig = arm_figures(records)
    assert (fig["val_loss"], fig["train_lm_loss"], fig["spikes"], fig["steps"]) == (1.5, 3.5, 1, 2)
    assert (fig["tokens_per_s"], fig["max_vio"], fig["dropped_fraction"]) == (20.0, 0.7, 0.1)
    assert fig["times"] == [1.0, 3.0] and fig["curves"]["max_vio"] == [(1, 0.5), (2, 0.7)]
    assert math.isnan(arm_figures([])["val_loss"])


def test_loss_at_equal_time_reads_each_arm_where_the_fastest_one_finished():
    fast = {"times": [1.0, 2.0], "losses": [(1, 5.0), (2, 4.0)]}
    slow = {"times": [1.5, 3.0], "losses": [(1, 4.5), (2, 3.0)]}
    add_loss_at_equal_time({"fast": [fast], "slow": [slow]})
    assert (fast["loss_at_equal_time"], slow["loss_at_equal_time"]) == (4.0, 4.5)


def test_verdict_reports_paired_differences_and_a_contrary_direction():
    results = {
        "a": [{"val_loss": 2.0}, {"val_loss": 2.0}],
        "b": [{"val_loss": 1.0}, {"val_loss": 1.5}],
    }
    text = verdict(("val_loss", "a", "b"), results)
    assert "= -0.75 (per seed: -1, -0.5)" in text and "differs from" in text
    results["b"][1]["val_loss"] = math.nan  # a diverged arm
    assert "not measurable" in verdict(("val_loss", "a", "b"), results)


# What issue 7 asks each report to show: columns of the table and plots beside loss.png.
REQUIRED = {
    "moe-vs-dense": (("val_loss", "active_params", "params", "tokens_per_s"), ()),
    "balance": (("max_vio", "val_loss"), ("max_vio.png",)),
    "granularity": (("val_loss", "loss_at_equal_time", "tokens_per_s"), ("loss_time.png",)),
    "z-loss": (("logit_rms", "spikes", "diverged", "steps"), ("logit_rms.png",)),
    "capacity": (("dropped_fraction", "val_loss", "tokens_per_s"), ("dropped_fraction.png",)),
    "mtp": (("val_loss", "loss_at_equal_time", "mtp_accuracy", "mtp_acceptance"), ()),
}


def fake_run(loss: float) -> dict:
    layer = {"max_vio": 0.5, "dropped_fraction": 0.1, "z_loss": 4.0}
    records = [{"kind": "train", "step": s, "lm_loss": loss / s, "tokens_per_s": 10.0,
                "seconds": 1.0, "layers": [layer]} for s in (1, 2)]  # fmt: skip
    run = arm_figures([*records, {"kind": "eval", "step": 2, "val_loss": loss}])
    run["curves"]["logit_rms"] = [(1, 3.0), (2, 2.0)]
    return run | {
        "logit_rms": 2.0,
        "diverged": False,
        "params": 9,
        "active_params": 5,
        "mtp_accuracy": 0.3,
        "mtp_error": 0.7,
        "mtp_acceptance": 0.6,
        "mtp_rejection": 0.4,
    }


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_each_report_has_the_issues_columns_plots_and_checks(name: str, tmp_path: Path):
    exp, base = EXPERIMENTS[name], RunConfig.preset("experiment")
    results = {arm: [fake_run(2.0 + i)] for i, (arm, _) in enumerate(exp.arms(base))}
    add_loss_at_equal_time(results)
    run = {"command": "moekit experiment x", "overrides": [], "seeds": 1, "wall_seconds": 60.0,
           "arm_threads": 1, "data_seconds": 1.0, "unigram_entropy": 5.0,
           "machine": {"cpu_model": "cpu", "cpu_count": 2, "torch": "2", "torch_threads": 2,
                       "loadavg_start": [1, 1, 1], "loadavg_end": [2, 2, 2]}}  # fmt: skip
    write_report(exp, run, results, base, tmp_path)
    report = (tmp_path / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| arm |"))
    columns, plots = REQUIRED[name]
    assert all(f" {c} |" in header for c in columns)
    for plot in ("loss.png", "loss_time.png", *plots):
        assert f"]({plot})" in report and (tmp_path / plot).stat().st_size > 1000
    assert report.count("- Measured: ") == len(exp.checks) >= 2
    assert f"Prediction: {exp.prediction}" in report and "Command: `moekit experiment x`" in report
    assert "load average" in report and "Unigram baseline" in report


def test_an_experiment_trains_its_arms_with_paired_seeds(tmp_path: Path, monkeypatch, capsys):
    source = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    data = DataConfig(source=source, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    t = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, log_every=1,
                    progress=False, tensorboard=False, data=data,
                    eval=EvalConfig(every=2, batches=1))  # fmt: skip
    base = RunConfig(model=ModelConfig.preset("tiny").replace(vocab_size=257), train=t)
    two_arms = Experiment("moe-vs-dense", "MoE beats dense", lambda b: moe_vs_dense(b)[:2],
                          (("val_loss", "hash", "dense"),))  # fmt: skip
    monkeypatch.setitem(EXPERIMENTS, "moe-vs-dense", two_arms)
    report = run_experiment("moe-vs-dense", base, tmp_path / "exp", seeds=2).read_text()
    assert "side by side" not in capsys.readouterr().err  # train.progress=False: no bar at all
    assert "| dense |" in report and "| hash |" in report
    assert "Measured: val_loss(dense) - val_loss(hash)" in report and "(per seed: " in report
    assert (tmp_path / "exp/arms/dense/seed-1/metrics.jsonl").is_file()
    results = json.loads((tmp_path / "exp/results.json").read_text())
    arms = results["arms"]
    assert len(arms["hash"]) == 2 and results["machine"]["loadavg_end"]
    assert math.isnan(arms["dense"][0]["logit_rms"])  # no router
    # zero logits: a hash router's logit_rms is log(E)
    assert arms["hash"][0]["logit_rms"] == pytest.approx(math.log(base.model.moe.n_experts))
    assert arms["hash"][0]["curves"]["logit_rms"] == [[2, arms["hash"][0]["logit_rms"]]]
    assert arms["dense"][0]["active_params"] < arms["hash"][0]["params"]
    assert "2 steps" in report and results["wall_seconds"] > 0


def test_the_experiment_preset_is_the_cli_default_with_each_experiments_steps(monkeypatch):
    seen = {}
    monkeypatch.setattr("moekit.experiments.runner.run_experiment",
                        lambda name, base, *a: seen.setdefault("base", base))  # fmt: skip
    assert main(["experiment", "balance", "--train.lr=1e-3"]) == 0
    assert seen["base"].train.steps == EXPERIMENTS["balance"].steps
    assert seen["base"].model == RunConfig.preset("experiment").model


def test_the_printed_config_is_the_one_the_arms_start_from(monkeypatch, capsys):
    """The experiment's own settings (z-loss keeps every 200th checkpoint) are in what is shown."""
    monkeypatch.setattr("moekit.experiments.runner.run_experiment", lambda *a: Path("r"))
    assert main(["experiment", "z-loss", "--train.lr=1e-3"]) == 0
    shown = json.loads(capsys.readouterr().out.split("resolved config:\n")[1].split("\nreport")[0])
    assert shown["train"]["checkpoint"]["every"] == 200 and shown["train"]["lr"] == 1e-3


def test_seeds_past_the_largest_seed_are_refused_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("moekit.experiments.runner.run_experiment", None)  # would raise
    out = f"--out={tmp_path / 'e'}"
    assert main(["experiment", "balance", "--seeds", "3", f"--train.seed={2**64 - 2}", out]) == 2
    err = capsys.readouterr().err
    assert "runs past the largest seed (2**64 - 1): give at most 2 seeds" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["granularity", "--model.moe.n_experts=16"], "--model.moe.n_experts is what the arms"),
        (["capacity", "--model.moe.capacity_factor=2"], "--model.moe.capacity_factor is what"),
        (["mtp", "--model.mtp_depth=2"], "--model.mtp_depth is what the arms of `mtp` set"),
        (["balance", "--model.moe=null"], "this base is dense (model.moe is None)"),
        (["balance", "--preset", "dense-small"], "this base is dense (model.moe is None)"),
    ],
)
def test_an_override_the_arms_replace_is_refused(argv, says, monkeypatch, capsys, tmp_path):
    """Each arm's own value had replaced it, silently; a dense base said "cannot set
    --model.moe.aux_loss_coef", a key the user never gave."""
    monkeypatch.setattr("moekit.experiments.runner.run_experiment", None)  # would raise
    assert main(["experiment", *argv, f"--out={tmp_path / 'e'}"]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1, err


def test_mtp_runs_on_a_dense_base_as_its_arms_vary_no_moe_layer() -> None:
    """A dense base is refused only for arms that vary or are sized on its MoE layers: `mtp`'s
    vary its MTP depth (a dense base was refused for every experiment, `mtp` included)."""
    dense = RunConfig.preset("dense-small")
    assert experiment_base("mtp", dense, []).model.moe is None
    for name in ("balance", "granularity", "moe-vs-dense"):
        with pytest.raises(ValueError, match="this base is dense"):
            experiment_base(name, dense, [])


@pytest.mark.parametrize(
    ("name", "override"),
    [
        ("z-loss", "--train.lr=0.003"),  # the preset's own, restated (the arms scale it)
        ("moe-vs-dense", "--model.moe.top_k=2"),  # the dense arm sets model.moe whole
        ("granularity", "--model.moe.normalize=true"),  # one arm sets it
        ("moe-vs-dense", "--model.moe.router_bias=false"),  # not model.moe.router
        ("capacity", "--model.moe.capacity_factor=null"),
    ],
)
def test_an_override_that_restates_the_base_is_taken(name: str, override: str) -> None:
    base = RunConfig.preset("experiment")
    assert experiment_base(name, base, [override]) == experiment_base(name, base, [])


def test_a_key_given_twice_that_restates_the_base_is_taken() -> None:
    base = RunConfig.preset("experiment")
    restated = ["--model.moe.capacity_factor=1.0", "--model.moe.capacity_factor=null"]
    assert experiment_base("capacity", base, restated) == experiment_base("capacity", base, [])


def test_a_base_the_arms_are_sized_on_reaches_them(monkeypatch):
    """z-loss's arms scale the base lr, granularity's the base's expert width: given by the user,
    they size the arms (the arms were sized on the preset's)."""
    seen: dict[str, RunConfig] = {}

    class Built(Exception):
        pass

    def capture(arms, *args, **kwargs):
        seen.update(arms)
        raise Built  # the arms are built: nothing is trained

    monkeypatch.setattr("moekit.experiments.runner.train_designs", capture)
    monkeypatch.setattr("moekit.experiments.runner.data_facts", lambda cfg: {})
    base = RunConfig.preset("experiment")
    with pytest.raises(Built):
        run_experiment("z-loss", base, "unused", 1, ["--train.lr=1e-3"])
    assert seen["no-z-lr4x"].train.lr == pytest.approx(4e-3)
    with pytest.raises(Built):
        run_experiment("granularity", base, "unused", 1, ["--model.moe.d_expert=256"])
    assert seen["E8-k1"].model.moe.d_expert == 2 * 256 // 4 * 4  # k F / 4 per F0, 4 F0 wide


def test_experiment_cli_refuses_an_unknown_name(capsys):
    with pytest.raises(SystemExit):
        main(["experiment", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def test_mtp_arms_and_their_head_figures(tmp_path: Path):
    """`moekit experiment mtp`: lambda 0.3 and 0.1 against no MTP; an arm's MTP-head accuracy
    and decode acceptance come from its last checkpoint (NaN without a head)."""
    from moekit.experiments.arms import mtp
    from moekit.experiments.runner import (
        MTP_NEW_TOKENS,
        MTP_PROMPT_TOKENS,
        MTP_PROMPTS,
        ArmProbe,
        mtp_figures,
    )
    from moekit.model.generation import generate
    from moekit.train import train

    base = RunConfig.preset("experiment")
    cfgs = {arm: apply_overrides(base, ov).model for arm, ov in mtp(base)}
    assert [(c.mtp_depth, c.mtp_loss_weight) for c in cfgs.values()][1:] == [(1, 0.3), (1, 0.1)]
    assert cfgs["no-mtp"].mtp_depth == 0
    source = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    data = DataConfig(source=source, tokenizer="bytes", cache_dir=str(tmp_path / "cache"))
    t = TrainConfig(steps=2, batch_size=2, seq_len=32, warmup_steps=1, log_every=1,
                    progress=False, tensorboard=False, data=data,
                    eval=EvalConfig(every=2, batches=1))  # fmt: skip
    model = ModelConfig.preset("tiny").replace(vocab_size=257, mtp_depth=1)
    cfg = RunConfig(model=model, train=t)
    train(cfg, tmp_path / "run")
    probe = ArmProbe.of(tmp_path / "run")
    figures = mtp_figures(probe, cfg)
    assert 0 <= figures["mtp_accuracy"] <= 1 and 0 <= figures["mtp_acceptance"] <= 1
    # recomputed: depth 1 at position i scores token i + 2 of the probe's batch ...
    trained, batch = probe.model, probe.batch
    with torch.no_grad():
        depth1 = trained(batch, mtp=True).mtp_logits[0]
    hits = [int(depth1[b, i].argmax()) == int(batch[b, i + 2])
            for b in range(batch.shape[0]) for i in range(batch.shape[1] - 2)]  # fmt: skip
    assert figures["mtp_accuracy"] == pytest.approx(sum(hits) / len(hits))

    # ... and the drafts accepted over those proposed, greedy, one draft a round, per prompt:
    # replayed on plain greedy decoding (which self-speculation reproduces) from one full forward,
    # not through the speculative loop. A round after position q drafts token q + 2 from depth 1
    # at q; accepted, the round emits it and the main model's next (q += 2), else its correction
    # (q += 1); no draft while fewer than two tokens remain.
    def replayed_acceptance() -> float:
        accepted = proposed = 0
        for prompt in batch[:MTP_PROMPTS, :MTP_PROMPT_TOKENS]:
            ids = torch.cat([prompt, generate(trained, prompt[None], MTP_NEW_TOKENS)[0]])
            with torch.no_grad():
                drafts = trained(ids[None], mtp=True).mtp_logits[0][0].argmax(-1)
            q, emitted = len(prompt) - 1, 1  # the prefill emits the first token
            while MTP_NEW_TOKENS - emitted >= 2:
                ok = int(drafts[q]) == int(ids[q + 2])
                proposed, accepted = proposed + 1, accepted + ok
                q, emitted = q + 1 + ok, emitted + 1 + ok
        assert proposed > 0
        return accepted / proposed

    assert figures["mtp_acceptance"] == pytest.approx(replayed_acceptance())
    # the trained head's drafts are all accepted (1.0): reseeded weights reject some, so both
    # branches of the replay are taken (the probe's model is `trained`)
    torch.manual_seed(1)
    trained.init_weights()
    reseeded = mtp_figures(probe, cfg)["mtp_acceptance"]
    assert 0 < reseeded < 1 and reseeded == pytest.approx(replayed_acceptance())
    assert figures["mtp_error"] == pytest.approx(1 - figures["mtp_accuracy"])
    assert figures["mtp_rejection"] == pytest.approx(1 - figures["mtp_acceptance"])
    plain = cfg.replace(model=model.replace(mtp_depth=0))
    assert all(math.isnan(v) for v in mtp_figures(probe, plain).values())
