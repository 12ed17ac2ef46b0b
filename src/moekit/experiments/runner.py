"""Run an experiment's arms with the same data order, gather their figures, write the report."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display
from torch import Tensor

from moekit.config import RunConfig
from moekit.data import fixed_batches, prepare_data
from moekit.experiments.arms import EXPERIMENTS, Experiment
from moekit.fileio import atomic_write_text
from moekit.losses import z_loss
from moekit.overrides import apply_overrides
from moekit.train import TrainingDiverged, latest_checkpoint, train
from moekit.train.metrics import read_metrics
from moekit.train.report import save_figure
from moekit.train.sample import load_run

SPIKE = 1.5  # a logged train loss above 1.5 x the lowest one before it is a spike


def run_experiment(
    name: str, base: RunConfig, out_dir: str | Path, seeds: int = 1,
    overrides: list[str] | None = None,
) -> Path:  # fmt: skip
    """Train every arm of experiment `name` `seeds` times (seeds base.train.seed + 0..seeds-1,
    the same for every arm: same initial RNG and batch order); write OUT/report.md."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    exp, out_dir = EXPERIMENTS[name], Path(out_dir)
    results: dict[str, list[dict[str, Any]]] = {}
    for arm, arm_overrides in exp.arms(base):
        for s in range(seeds):
            seed = f"--train.seed={base.train.seed + s}"
            cfg = apply_overrides(base, [*(overrides or []), *arm_overrides, seed])
            results.setdefault(arm, []).append(_train_arm(cfg, out_dir / arm / f"seed-{s}"))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    path = out_dir / "report.md"
    save_figure(loss_figure(results), out_dir / "loss.png")
    shown = apply_overrides(base, overrides or [])
    atomic_write_text(path, report_text(exp, results, shown, overrides or []))
    return path


def _train_arm(cfg: RunConfig, run_dir: Path) -> dict[str, Any]:
    try:
        result = train(cfg, run_dir)
        diverged = False
    except TrainingDiverged:
        result, diverged = None, True
    figures = arm_figures(read_metrics(run_dir / "metrics.jsonl"))
    figures["logit_rms"] = router_logit_rms(run_dir)
    return figures | {"diverged": diverged, "seconds": result.seconds if result else None}


@torch.no_grad()
def router_logit_rms(run_dir: Path) -> float:
    """sqrt(mean over tokens and layers of logsumexp(router logits)^2) of the run's newest
    checkpoint on one fixed validation batch: the magnitude the z-loss (ST-MoE) penalises, measured
    whether or not the arm trains with it. NaN for a dense model or a run without checkpoint."""
    if latest_checkpoint(run_dir) is None:
        return math.nan
    cfg, model, _ = load_run(run_dir)
    if not model.moe_layers():
        return math.nan
    data = prepare_data(cfg.train.data, cfg.token_vocab_size)
    batch = fixed_batches(data.val.tokens, 1, cfg.train.batch_size, cfg.train.seq_len)[0]
    z: list[Tensor] = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: z.append(z_loss(out.logits_TE)))
             for m in model.moe_layers()]  # fmt: skip
    model(batch)
    for hook in hooks:
        hook.remove()
    return math.sqrt(float(torch.stack(z).mean()))


def arm_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's figures from its metrics.jsonl records (NaN where the run logged none)."""
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last = train_recs[-1] if train_recs else {}
    layers = last.get("layers", [])
    losses = [r["lm_loss"] for r in train_recs]
    spikes = sum(loss > SPIKE * min(losses[:i]) for i, loss in enumerate(losses) if i)
    mean = lambda key: _mean([layer[key] for layer in layers])  # noqa: E731
    return {
        "val_loss": evals[-1]["val_loss"] if evals else math.nan,
        "train_lm_loss": losses[-1] if losses else math.nan,
        "max_vio": max((layer["max_vio"] for layer in layers), default=math.nan),
        "dropped_fraction": mean("dropped_fraction"),
        "tokens_per_s": _mean([r["tokens_per_s"] for r in train_recs]),
        "spikes": spikes,
        "losses": [(r["step"], r["lm_loss"]) for r in train_recs],
    }


def loss_figure(results: dict[str, list[dict[str, Any]]]) -> Figure:
    """Train language-model loss (without the balance losses) against step, one line per arm
    (its first seed)."""
    fig = Figure(figsize=(6.0, 3.8))
    ax = fig.subplots()
    for arm, runs in results.items():
        if runs[0]["losses"]:
            steps, losses = zip(*runs[0]["losses"], strict=True)
            ax.plot(steps, losses, label=arm)
    ax.set_xlabel("step")
    ax.set_ylabel("train LM loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


COLUMNS = ("val_loss", "train_lm_loss", "max_vio", "dropped_fraction", "logit_rms", "tokens_per_s",
           "spikes", "seconds")  # fmt: skip


def report_text(
    exp: Experiment, results: dict[str, list[dict[str, Any]]], base: RunConfig, overrides: list[str]
) -> str:
    """The report: prediction, arms table (mean over seeds), and the measured direction."""
    lines = [f"# Experiment: {exp.name}", "", f"Prediction: {exp.prediction}", "",
             f"Base: {base.train.steps} steps of {base.train.batch_size} x {base.train.seq_len} "
             f"tokens on {base.train.data.source}; overrides for all arms: {overrides or 'none'}; "
             f"{len(next(iter(results.values())))} seed(s) per arm.", "",
             "| arm | " + " | ".join(COLUMNS) + " | diverged |",
             "|---" * (len(COLUMNS) + 2) + "|"]  # fmt: skip
    for arm, runs in results.items():
        cells = [_fmt(_mean([r[c] for r in runs if r[c] is not None])) for c in COLUMNS]
        diverged = sum(r["diverged"] for r in runs)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {diverged}/{len(runs)} |")
    lines += ["", verdict(exp, results), "", "![train loss of every arm](loss.png)", ""]
    return "\n".join(lines)


def verdict(exp: Experiment, results: dict[str, list[dict[str, Any]]]) -> str:
    """Paired differences (worse - better) of the metric per seed, and whether they agree."""
    if exp.better is None:
        return ""
    good, bad = exp.better
    diffs = [
        b[exp.metric] - g[exp.metric] for g, b in zip(results[good], results[bad], strict=True)
    ]
    mean = _mean(diffs)
    agrees = "agrees with" if mean > 0 else "differs from"
    per_seed = ", ".join(_fmt(d) for d in diffs)
    return (f"Measured: {exp.metric}({bad}) - {exp.metric}({good}) = {_fmt(mean)} "
            f"(per seed: {per_seed}); the direction {agrees} the paper's.")  # fmt: skip


def _fmt(value: float) -> str:
    return "nan" if value != value else f"{value:.4g}"
