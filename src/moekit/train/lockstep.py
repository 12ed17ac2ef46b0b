"""Several runs trained in lockstep, one optimizer step of each in turn, and compared with one of
them: how `moekit demo` and the MoE-versus-dense benchmarks measure what an MoE buys.

In lockstep every run sees the same machine load, so their throughputs and training times compare
side by side; with the same seed they draw the same batches in the same order. Each run is an
ordinary run directory (metrics.jsonl, checkpoints) that `moekit generate` and `analyze` read.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moekit.config import RunConfig, TrainConfig
from moekit.train.loop import Trainer
from moekit.train.metrics import read_metrics


def lockstep_settings(train: TrainConfig, steps: int, evals: int) -> TrainConfig:
    """`train` for `steps` steps with `evals` evaluations, ~50 logged steps, no progress bar,
    TensorBoard or intermediate checkpoints: what runs in lockstep use."""
    return train.replace(
        steps=steps,
        progress=False,
        tensorboard=False,
        log_every=max(1, steps // 50),
        eval=train.eval.replace(every=max(1, steps // evals)),
        checkpoint=train.checkpoint.replace(every=0, keep=1),
    )


def train_in_lockstep(
    configs: Mapping[str, RunConfig], run_dirs: Mapping[str, Path], progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Train every config into its run directory one step at a time in turn (all need the same
    train.steps); return each run's `run_summary`."""
    steps = {cfg.train.steps for cfg in configs.values()}
    if len(steps) != 1:
        raise ValueError(f"runs in lockstep need the same train.steps, got {sorted(steps)}")
    trainers = {
        name: Trainer(cfg, Path(run_dirs[name]), resume=False) for name, cfg in configs.items()
    }
    bar = tqdm(
        total=steps.pop(), desc="lockstep", unit="step", file=sys.stderr, disable=not progress
    )
    try:
        with bar:
            while not all(t.done for t in trainers.values()):
                losses = {name: t.advance()[0].lm_loss for name, t in trainers.items()}
                bar.set_postfix({name: f"{loss:.3f}" for name, loss in losses.items()})
                bar.update()
        for trainer in trainers.values():
            trainer.finish()
    finally:
        for trainer in trainers.values():
            trainer.close()
    return {name: run_summary(Path(run_dirs[name]), trainer) for name, trainer in trainers.items()}


def run_summary(run_dir: Path, trainer: Trainer) -> dict[str, Any]:
    """A run's sizes, throughput, final losses, validation curve [[step, loss]] and training
    seconds at each logged step [[step, seconds]] (optimizer steps only: no evaluation)."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    elapsed = list(itertools.accumulate(r["seconds"] for r in train))
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in train)
    return {
        "parameters": trainer.model.num_parameters(),
        "active_parameters": trainer.model.num_parameters(active=True),
        "tokens_per_s": tokens / elapsed[-1],
        "train_seconds": elapsed[-1],
        "final_train_loss": train[-1]["lm_loss"],
        "final_val_loss": evals[-1]["val_loss"],
        "final_val_bpb": evals[-1]["val_bpb"],
        "val_curve": [[r["step"], r["val_loss"]] for r in evals],
        "seconds_curve": [[r["step"], s] for r, s in zip(train, elapsed, strict=True)],
    }


def first_step_reaching(curve: list[list[float]], loss: float) -> int | None:
    """The first evaluated step whose validation loss is <= `loss` (None if none is)."""
    return next((int(step) for step, value in curve if value <= loss), None)


def seconds_at(run: Mapping[str, Any], step: float) -> float:
    """Training seconds the run had spent when it finished `step` (linear between logged steps)."""
    points = [(0, 0.0), *run["seconds_curve"]]
    for (s0, t0), (s1, t1) in itertools.pairwise(points):
        if step <= s1:
            return t0 + (t1 - t0) * (step - s0) / max(s1 - s0, 1)
    return points[-1][1]


def compare_to(
    runs: Mapping[str, Mapping[str, Any]], baseline: str, steps: int
) -> dict[str, dict[str, Any]]:
    """Each run against `baseline`: the step ratio (the first evaluated step at or below the
    baseline's final validation loss, over the steps; None if never), the time ratio (training
    seconds to that step over the baseline's whole run: what a user pays), the throughput ratio,
    how far below the baseline's final loss it ends, and its own final losses."""
    base = runs[baseline]
    out = {}
    for name, run in runs.items():
        reach = first_step_reaching(run["val_curve"], base["final_val_loss"])
        out[name] = {
            "step_ratio": None if reach is None else reach / steps,
            "time_ratio": None if reach is None else seconds_at(run, reach) / base["train_seconds"],
            "throughput_ratio": run["tokens_per_s"] / base["tokens_per_s"],
            "val_loss_below": base["final_val_loss"] - run["final_val_loss"],
            "final_val_loss": run["final_val_loss"],
            "final_val_bpb": run["final_val_bpb"],
        }
    return out
