"""Several runs trained side by side and compared with one of them: how `moekit demo` and the
MoE-versus-dense benchmarks measure what an MoE buys. With the same seed every run draws the same
batches in the same order; each is an ordinary run directory (metrics.jsonl, checkpoints) that
`moekit generate` and `analyze` read. Two ways to share the machine:

  train_in_lockstep  one process, one optimizer step of each run in turn: every run sees the same
                     machine load and uses all its threads (the benchmarks).
  train_in_parallel  one process per run at the same time, each with its share of the cores
                     (`moekit demo`: on 2 cores, two 1-thread runs take about half the time of
                     the lockstep, whose small products gain little from a second thread).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moekit.config import RunConfig, TrainConfig
from moekit.data import prepare_data
from moekit.model import parameter_breakdown
from moekit.train.loop import Trainer, train
from moekit.train.metrics import read_metrics


class SideBySideFailed(RuntimeError):
    """A run of `train_in_parallel` stopped with an error (which its process printed)."""


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
    return {name: run_summary(run_dirs[name], configs[name]) for name in configs}


def train_in_parallel(
    configs: Mapping[str, RunConfig], run_dirs: Mapping[str, Path], progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Train every config into its run directory at the same time, each in a process of its own
    with cpu_count // len(configs) threads (at least 1); return each run's `run_summary`. The data
    is prepared (and cached) once first. A run that fails raises once all have stopped."""
    threads = max(1, (os.cpu_count() or 1) // len(configs))
    prepared = set()
    for name, cfg in configs.items():  # each corpus and tokenizer once, before the processes
        key = (cfg.train.data.to_json(), cfg.token_vocab_size)
        if key not in prepared:
            prepare_data(cfg.train.data, cfg.token_vocab_size, progress, Path(run_dirs[name]))
            prepared.add(key)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
    processes = {}
    for name, cfg in configs.items():
        train = cfg.train.replace(threads=threads, progress=False)
        processes[name] = context.Process(
            target=_train_one, args=(cfg.replace(train=train), str(run_dirs[name])), name=name
        )
        processes[name].start()
    total = sum(cfg.train.steps for cfg in configs.values())
    with tqdm(total=total, desc="side by side", unit="step", file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        while any(p.is_alive() for p in processes.values()):
            time.sleep(1.0)
            done = {name: _logged_step(Path(run_dirs[name])) for name in configs}
            bar.update(sum(done.values()) - bar.n)
            bar.set_postfix({name: f"step {step}" for name, step in done.items()})
    if failed := [name for name, p in processes.items() if p.exitcode != 0]:
        raise SideBySideFailed(f"training {', '.join(failed)} failed (its error is above)")
    return {name: run_summary(run_dirs[name], configs[name]) for name in configs}


def _train_one(cfg: RunConfig, run_dir: str) -> None:
    train(cfg, run_dir)


def _logged_step(run_dir: Path) -> int:
    """The step of the run's newest training record (0 before the first)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if record.get("kind") == "train":
            return record["step"]
    return 0


def run_summary(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """A run's sizes, throughput, final losses, validation curve [[step, loss]] and training
    seconds at each logged step [[step, seconds]] (optimizer steps only: no evaluation)."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    elapsed = list(itertools.accumulate(r["seconds"] for r in train))
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in train)
    counts = parameter_breakdown(cfg.model)
    return {
        "parameters": counts["total"],
        "active_parameters": counts["active"],
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
