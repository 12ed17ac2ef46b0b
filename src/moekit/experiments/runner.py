"""Run an experiment's arms with the same data order, gather their figures, write the report."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from moekit.config import RunConfig
from moekit.data import fixed_batches, prepare_data
from moekit.experiments.arms import EXPERIMENTS, Experiment
from moekit.fileio import atomic_write_text, save_figure
from moekit.losses import z_loss
from moekit.machine import machine_info
from moekit.model import MoETransformer, generate, parameter_breakdown
from moekit.model.speculative import SpeculativeStats
from moekit.overrides import apply_overrides, split_override, touches
from moekit.train.checkpoint import list_checkpoints, load_weights
from moekit.train.lockstep import design_configs, parallel_threads, train_designs
from moekit.train.metrics import read_metrics
from moekit.train.report import curves_figure
from moekit.train.sample import load_run

SPIKE = 1.5  # a logged train loss above 1.5 x the lowest one before it is a spike
ARMS_DIR = "arms"  # OUT/arms/ARM/seed-N: the arms' run directories, apart from the report files
RESULTS_FILE = "results.json"  # OUT/results.json: every arm's figures
CURVES = {"max_vio": "MaxVio (max over layers)", "dropped_fraction": "dropped fraction",
          "logit_rms": "router logit RMS, sqrt(z-loss), at each checkpoint"}  # fmt: skip
LOGGED = ("max_vio", "dropped_fraction")  # curves from the train records; logit_rms: checkpoints


def experiment_base(name: str, base: RunConfig, overrides: list[str]) -> RunConfig:
    """The config every arm of experiment `name` starts from: `base` with the experiment's own
    settings, then the user's `overrides`. The arms are sized on it (a base lr or expert width
    the user gives scales them); an override of what every arm sets to its own value, which it
    would not change, is refused (it was replaced, silently): ValueError naming it."""
    return _base_and_designs(name, base, overrides)[0]


def _base_and_designs(
    name: str, base: RunConfig, overrides: list[str]
) -> tuple[RunConfig, dict[str, RunConfig]]:
    """`experiment_base` and the arms' configs sized on it (`design_configs`)."""
    exp = EXPERIMENTS[name]
    settled = apply_overrides(base, exp.settings)
    shown = apply_overrides(settled, overrides)  # the user's last
    if shown.model.moe is None and _varies_moe(exp, shown):
        raise ValueError(
            f"the arms of `{name}` vary a base run's MoE layers, and this base is dense (model.moe "
            "is None): give an MoE preset or config (the default, experiment, is one)"
        )
    arms = exp.arms(shown)
    designs = design_configs(shown, dict(arms))
    varied = {split_override(item)[0] for _, arm in arms for item in arm}
    keys = [split_override(item)[0] for item in overrides]
    for key in dict.fromkeys(k for k in keys if touches(k, varied)):  # each key once
        try:  # the base without this key (given once or more: the last one counts)
            others = [o for o, k in zip(overrides, keys, strict=True) if k != key]
            rest = apply_overrides(settled, others)
            replaced = rest != shown and design_configs(rest, dict(exp.arms(rest))) == designs
        except ValueError:  # the base without it is not a config: it is needed, not replaced
            replaced = False
        if replaced:  # it changed the base, and no arm
            clash = ", ".join(sorted(v for v in varied if touches(key, [v])))
            raise ValueError(
                f"--{key} is what the arms of `{name}` set ({clash}), each to its own value: "
                "drop it"
            )
    return shown, designs


def _varies_moe(exp: Experiment, base: RunConfig) -> bool:
    """Whether the arms of `exp` set or are sized on `base`'s MoE layers (`mtp`'s do neither: it
    runs on a dense base too)."""
    try:
        arms = exp.arms(base)
    except ValueError:  # sized on the MoE layers, which a dense base has not (arms._moe)
        return True
    return any(touches("model.moe", [split_override(item)[0]]) for _, arm in arms for item in arm)


def run_experiment(
    name: str, base: RunConfig, out_dir: str | Path, seeds: int = 1,
    overrides: list[str] | None = None, command: str | None = None,
) -> Path:  # fmt: skip
    """Train every arm of experiment `name` `seeds` times (seeds train.seed + 0..seeds-1 of the
    base with the overrides, the same for every arm: same initial RNG and batch order); write
    OUT/report.md, results.json and the plots, the arms' runs under OUT/arms/. `command` is
    recorded as given. Each seed's arms train side by side: they share the machine alike."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}")
    exp, out_dir, begin = EXPERIMENTS[name], Path(out_dir), time.perf_counter()
    machine = machine_info()
    shown, arms = _base_and_designs(name, base, overrides or [])  # sized on the user's base
    overrides = [*exp.settings, *(overrides or [])]
    setup, bar = data_facts(shown), shown.train.progress  # (false: no bar over the arms either)
    per_seed = list(train_designs(arms, seeds, out_dir / ARMS_DIR, True, arm_results, bar))
    results = {arm: [runs[arm] for runs in per_seed] for arm in arms}
    add_loss_at_equal_time(results)
    machine["loadavg_end"] = list(os.getloadavg())
    arm_threads = shown.train.threads or parallel_threads(len(arms))
    run = {"experiment": name, "command": command, "overrides": overrides, "seeds": seeds,
           "arm_threads": arm_threads, "wall_seconds": time.perf_counter() - begin, **setup,
           "machine": machine, "base": json.loads(shown.to_json())}  # fmt: skip
    write_report(exp, run, results, shown, out_dir)
    return out_dir / "report.md"


def write_report(
    exp: Experiment, run: dict[str, Any], results: dict[str, list[dict[str, Any]]],
    base: RunConfig, out_dir: Path,
) -> None:  # fmt: skip
    """results.json, the plots and report.md (last: its presence means the others are there)."""
    atomic_write_text(out_dir / RESULTS_FILE, json.dumps(run | {"arms": results}, indent=1))
    first = {arm: runs[0] for arm, runs in results.items()}
    losses = {arm: run["losses"] for arm, run in first.items()}
    save_figure(curves_figure(losses, "step", "train LM loss"), out_dir / "loss.png")
    timed = {arm: [(t, loss) for t, (_, loss) in zip(run["times"], run["losses"], strict=True)]
             for arm, run in first.items()}  # fmt: skip
    xlabel = "training seconds (steps only, this machine)"
    save_figure(curves_figure(timed, xlabel, "train LM loss"), out_dir / "loss_time.png")
    if exp.curve:
        curves = {arm: run["curves"][exp.curve] for arm, run in first.items()}
        figure = curves_figure(curves, "step", CURVES[exp.curve], loss=False)
        save_figure(figure, out_dir / f"{exp.curve}.png")
    atomic_write_text(out_dir / "report.md", report_text(exp, results, base, run))


def data_facts(cfg: RunConfig) -> dict[str, float]:
    """Prepare the data once before the arms (the arms then read the cache); how long it took
    and the unigram entropy of the training tokens: the loss of a model that learned only the
    token frequencies, the line a model must get well below."""
    begin = time.perf_counter()
    data = prepare_data(cfg.train.data, cfg.token_vocab_size)
    seconds = time.perf_counter() - begin
    counts = np.bincount(np.asarray(data.train.tokens), minlength=cfg.token_vocab_size)
    p = counts[counts > 0] / counts.sum()
    return {"data_seconds": seconds, "unigram_entropy": float(-(p * np.log(p)).sum())}


def arm_results(run_dir: Path, cfg: RunConfig, diverged: bool) -> dict[str, Any]:
    """An arm's figures (`arm_figures`), its router logit RMS curve and its total and active
    (per token) parameters."""
    figures = arm_figures(read_metrics(run_dir / "metrics.jsonl"))
    probe = ArmProbe.of(run_dir)
    rms = router_logit_rms(probe)
    figures["curves"]["logit_rms"] = rms
    figures["logit_rms"] = rms[-1][1] if rms else math.nan
    counts = parameter_breakdown(cfg.model)  # what trains: the MTP module too, where there is one
    return figures | mtp_figures(probe, cfg) | {
        "diverged": diverged, "params": counts["total"] + counts["mtp"],
        "active_params": counts["active"] + counts["mtp_active"]}  # fmt: skip


@dataclass
class ArmProbe:
    """What the probes of a trained arm read, loaded once: its checkpoints (oldest first), its
    config and model with the last one's weights (eval mode; None without a checkpoint), and
    `batch`, one fixed validation batch (B, S) of its training shape, prepared when first read."""

    checkpoints: list[Path]
    cfg: RunConfig | None
    model: MoETransformer | None

    @classmethod
    def of(cls, run_dir: Path) -> ArmProbe:
        checkpoints = list_checkpoints(run_dir)
        if not checkpoints:
            return cls(checkpoints, None, None)
        cfg, model, _ = load_run(run_dir)
        return cls(checkpoints, cfg, model)

    @functools.cached_property
    def batch(self) -> Tensor:
        assert self.cfg is not None
        t = self.cfg.train
        data = prepare_data(t.data, self.cfg.token_vocab_size)
        return fixed_batches(data.val.tokens, 1, t.batch_size, t.seq_len)[0]


@torch.no_grad()
def router_logit_rms(probe: ArmProbe) -> list[tuple[int, float]]:
    """(step, sqrt(mean over tokens and layers of logsumexp(router logits)^2)) of each of the
    run's checkpoints on the probe's validation batch: the magnitude the z-loss (ST-MoE)
    penalises, measured whether or not the arm trains with it. Empty for a dense model or no
    checkpoint. Leaves the model with the last checkpoint's weights, as it was."""
    model = probe.model
    if model is None or not model.moe_layers():
        return []
    batch = probe.batch
    z: list[Tensor] = []
    hooks = [m.router.register_forward_hook(lambda _m, _i, out: z.append(z_loss(out.logits_TE)))
             for m in model.moe_layers()]  # fmt: skip
    curve = []
    for checkpoint in probe.checkpoints:
        load_weights(checkpoint, model)
        z.clear()
        model(batch)
        step = int(checkpoint.name.removeprefix("step-"))
        curve.append((step, math.sqrt(float(torch.stack(z).mean()))))
    for hook in hooks:
        hook.remove()
    return curve


MTP_PROMPTS, MTP_PROMPT_TOKENS, MTP_NEW_TOKENS = 4, 32, 32


@torch.no_grad()
def mtp_figures(probe: ArmProbe, cfg: RunConfig) -> dict[str, float]:
    """With the last checkpoint's weights: the first MTP depth's top-1 accuracy on the token two
    ahead over one fixed validation batch, and the acceptance rate of its drafts in greedy
    self-speculative decoding (one draft a round) of `MTP_NEW_TOKENS` tokens after each of
    `MTP_PROMPTS` validation prompts; error and rejection are 1 minus each (the checks read lower
    as better). NaN without an MTP head or a checkpoint."""
    model = probe.model
    if cfg.model.mtp_depth == 0 or model is None:
        return dict.fromkeys(
            ("mtp_accuracy", "mtp_error", "mtp_acceptance", "mtp_rejection"), math.nan
        )
    batch = probe.batch
    logits = model(batch, mtp=True, with_aux=False).mtp_logits[0]  # position i: token i + 2
    accuracy = float((logits[:, :-2].argmax(-1) == batch[:, 2:]).float().mean())
    accepted = proposed = 0
    for prompt in batch[:MTP_PROMPTS, :MTP_PROMPT_TOKENS]:
        stats = SpeculativeStats()
        generate(model, prompt[None], MTP_NEW_TOKENS, speculative="mtp", draft_tokens=1,
                 stats=stats)  # fmt: skip
        accepted, proposed = accepted + stats.accepted[0], proposed + stats.proposed[0]
    acceptance = accepted / proposed if proposed else math.nan
    return {"mtp_accuracy": accuracy, "mtp_error": 1 - accuracy, "mtp_acceptance": acceptance,
            "mtp_rejection": 1 - acceptance}  # fmt: skip


def arm_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's figures from its metrics.jsonl records (NaN where the run logged none), and its
    per-record curves: "losses" and "curves" (each of `LOGGED`) as (step, value) pairs, and
    "times" (the training seconds spent up to each record: steps only, evaluation and checkpoints
    excluded)."""
    train_recs = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last = train_recs[-1] if train_recs else {"layers": []}
    losses = [r["lm_loss"] for r in train_recs]
    spikes = sum(loss > SPIKE * min(losses[:i]) for i, loss in enumerate(losses) if i)
    curves = {key: [(r["step"], _layer_figure(r, key)) for r in train_recs] for key in LOGGED}
    times = np.cumsum([r["seconds"] for r in train_recs]).tolist()
    return {
        "val_loss": evals[-1]["val_loss"] if evals else math.nan,
        "train_lm_loss": losses[-1] if losses else math.nan,
        **{key: _layer_figure(last, key) for key in LOGGED},
        "tokens_per_s": _mean([r["tokens_per_s"] for r in train_recs]),
        "spikes": spikes,
        "seconds": times[-1] if times else math.nan,
        "steps": train_recs[-1]["step"] if train_recs else 0,
        "losses": [(r["step"], r["lm_loss"]) for r in train_recs],
        "times": times,
        "curves": curves,
    }


def _layer_figure(record: dict[str, Any], key: str) -> float:
    """MaxVio: the worst layer's; dropped fraction: the layers' mean. NaN without MoE layers."""
    layers = record["layers"]
    if not layers:
        return math.nan
    if key == "max_vio":
        return max(layer["max_vio"] for layer in layers)
    return _mean([layer[key] for layer in layers])


def add_loss_at_equal_time(results: dict[str, list[dict[str, Any]]]) -> None:
    """Per seed, each arm's train LM loss at the training time the fastest arm finished in (its
    last record at or before that time): the loss per second of compute, beside the loss per
    step. NaN for a run that logged nothing by then."""
    for s in range(len(next(iter(results.values())))):
        runs = [r[s] for r in results.values()]
        budget = min((r["times"][-1] for r in runs if r["times"]), default=math.nan)
        for r in runs:
            done = [loss for t, (_, loss) in zip(r["times"], r["losses"], strict=True)
                    if t <= budget * (1 + 1e-9)]  # fmt: skip
            r["loss_at_equal_time"] = done[-1] if done else math.nan
            r["equal_time_s"] = budget


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


COLUMNS = ("val_loss", "train_lm_loss", "loss_at_equal_time", "max_vio", "dropped_fraction",
           "logit_rms", "spikes", "tokens_per_s", "seconds", "steps", "active_params",
           "params")  # fmt: skip


def report_text(
    exp: Experiment, results: dict[str, list[dict[str, Any]]], base: RunConfig,
    run: dict[str, Any],
) -> str:  # fmt: skip
    """The report: prediction, how it ran, arms table (mean over seeds), plots, and the measured
    direction of every check."""
    columns = (*COLUMNS, *exp.columns)
    lines = [f"# Experiment: {exp.name}", "", f"Prediction: {exp.prediction}", "",
             *_setup_lines(base, run), "",
             "| arm | " + " | ".join(columns) + " | diverged |",
             "|---" * (len(columns) + 2) + "|"]  # fmt: skip
    for arm, runs in results.items():
        cells = [_fmt(_mean([r[c] for r in runs if r.get(c) is not None])) for c in columns]
        diverged = sum(r["diverged"] for r in runs)
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {diverged}/{len(runs)} |")
    lines += ["", COLUMN_NOTES, "", "## Measured direction", "",
              *[f"- {verdict(check, results)}" for check in exp.checks], "", _noise_note(run), "",
              "## Plots", "", "![train LM loss per step](loss.png)", "",
              "![train LM loss per training second](loss_time.png)", ""]  # fmt: skip
    if exp.curve:
        lines += [f"![{CURVES[exp.curve]} per step]({exp.curve}.png)", ""]
    return "\n".join(lines)


def _setup_lines(base: RunConfig, run: dict[str, Any]) -> list[str]:
    m, t = run["machine"], base.train
    moe = base.model.moe
    experts = f"{moe.n_experts} experts of {moe.d_expert}, top-{moe.top_k}" if moe else "dense"
    model = f"{base.model.n_layers} layers of width {base.model.d_model}, {experts}"
    return [
        f"Command: `{run['command'] or 'run_experiment(...)'}`; overrides for all arms (the "
        f"experiment's settings, then the command's): {run['overrides'] or 'none'}; "
        f"{run['seeds']} seed(s) per arm.",
        f"Base: {model}; {t.steps} steps of {t.batch_size} x {t.seq_len} tokens on "
        f"{t.data.source} ({t.data.tokenizer}, vocabulary {base.token_vocab_size}), lr {t.lr:g}.",
        f"Wall time of the whole experiment: {run['wall_seconds'] / 60:.1f} min (data preparation "
        f"{run['data_seconds']:.1f} s). Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch "
        f"{m['torch']}; the arms of each seed trained side by side, each in a process of "
        f"{run['arm_threads']} thread(s); load average (1, 5, 15 min) "
        f"{_load(m['loadavg_start'])} at the start, {_load(m['loadavg_end'])} at the end.",
        f"Unigram baseline: the training tokens' unigram entropy is "
        f"{run['unigram_entropy']:.3f} nats, the loss of a model that learned only token "
        f"frequencies.",
    ]


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


COLUMN_NOTES = (
    "Columns: val_loss on fixed held-out windows after the last step (or the last evaluation "
    "before a divergence); train_lm_loss averaged "
    "over the last logged steps (balance losses excluded); loss_at_equal_time the train LM loss "
    "when the arm had trained as many seconds as the fastest arm did in all; max_vio the worst "
    "layer's MaxVio (max load / mean load - 1) over the last logged steps; dropped_fraction the "
    "share of expert assignments dropped by capacity; logit_rms the router logits' "
    "sqrt(mean logsumexp^2) on a fixed validation batch with the last checkpoint's weights; "
    f"spikes the logged train losses above {SPIKE} x the lowest before them; tokens_per_s and "
    "seconds of training steps (evaluation excluded; the machine is shared, so timings carry "
    "its load); steps the last step reached (fewer when the arm diverged); active_params per "
    "token. Where an arm has an MTP head: mtp_accuracy its first depth's top-1 accuracy on the "
    "token two ahead over a fixed validation batch, mtp_acceptance the share of its drafts "
    f"accepted in greedy self-speculative decoding (one draft a round, {MTP_NEW_TOKENS} tokens "
    f"after each of {MTP_PROMPTS} validation prompts), both with the last checkpoint's weights; "
    "mtp_error and mtp_rejection are 1 minus each."
)


def _noise_note(run: dict[str, Any]) -> str:
    if run["seeds"] > 1:
        return ("Differences are paired: the same seed gives both arms the same initial RNG and "
                "batch order; each per-seed difference is listed.")  # fmt: skip
    return ("One seed per arm: a difference smaller than the spread between seeds is not "
            "evidence; `--seeds N` repeats every arm and reports paired differences.")  # fmt: skip


def verdict(check: tuple[str, str, str], results: dict[str, list[dict[str, Any]]]) -> str:
    """Paired differences metric(worse) - metric(better) per seed, and whether their mean has
    the paper's sign (positive)."""
    metric, good, bad = check
    diffs = [b[metric] - g[metric] for g, b in zip(results[good], results[bad], strict=True)]
    mean = _mean(diffs)
    per_seed = ", ".join(_fmt(d) for d in diffs)
    if mean != mean:
        direction = "not measurable (an arm diverged or logged no value)"
    elif mean == 0:
        direction = "no difference: the paper expects a positive one"
    else:
        direction = f"the direction {'agrees with' if mean > 0 else 'differs from'} the paper's"
    return (f"Measured: {metric}({bad}) - {metric}({good}) = {_fmt(mean)} "
            f"(per seed: {per_seed}); {direction}.")  # fmt: skip


def _fmt(value: float) -> str:
    if value != value:
        return "nan"
    return f"{value:.0f}" if abs(value) >= 1e5 else f"{value:.4g}"
