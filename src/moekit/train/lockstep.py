"""Designs trained side by side and compared with one of them: how `moekit demo`, `moekit
experiment` and the MoE benchmarks measure what an MoE buys. A design is a base run with
overrides (`design_configs`); with the same seed every run draws the same batches in the same
order, and each is an ordinary run directory that `moekit generate` and `analyze` read. Two ways
to share the machine:

  train_in_lockstep  one process, one optimizer step of each run in turn: every run sees the same
                     machine load and uses all its threads (the benchmarks).
  run_in_parallel    a process per run at once, each with its share of the cores (`moekit demo`,
                     `moekit experiment`: on 2 cores each run keeps a core to itself, where in
                     lockstep a small model's small products gain little from a second thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from moekit.config import RunConfig, TrainConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.data import prepare_data
from moekit.fileio import make_dirs
from moekit.model import parameter_breakdown
from moekit.overrides import apply_overrides
from moekit.train.loop import Trainer, TrainingDiverged, train
from moekit.train.metrics import read_metrics
from moekit.train.report import summary
from moekit.train.run_dir import check_run_dir


class SideBySideFailed(RuntimeError):
    """A run of `run_in_parallel` stopped with an error (which its process printed)."""


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


def design_configs(base: RunConfig, designs: Mapping[str, Sequence[str]]) -> dict[str, RunConfig]:
    """Each design's config: `base` with the design's overrides ("--a.b=value")."""
    return {name: apply_overrides(base, overrides) for name, overrides in designs.items()}


def train_designs(
    configs: Mapping[str, RunConfig], seeds: int = 1, out: Path | None = None,
    parallel: bool = False, summarise: Callable[[Path, RunConfig, bool], Any] | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Train the designs side by side once per seed, train.seed + 0..seeds-1 (one seed: the same
    initial RNG and batch order for all), in lockstep or with `parallel` a process each, where a
    diverged run ends alone (`run_in_parallel`); the runs are out/NAME/seed-N, or temporary;
    `progress`: a bar over the runs' steps. Yields each seed's {name: summarise(run_dir, config,
    diverged)}, by default `run_summary`."""
    summarise = summarise or (lambda run_dir, cfg, _: run_summary(run_dir, cfg))
    for s in range(seeds):
        seeded = {name: cfg.replace(train=cfg.train.replace(seed=cfg.train.seed + s))
                  for name, cfg in configs.items()}  # fmt: skip
        with tempfile.TemporaryDirectory() as work:
            dirs = {name: Path(out or work) / name / f"seed-{s}" for name in configs}
            if parallel:
                diverged = run_in_parallel(seeded, dirs, progress, divergence_ends_a_run=True)
            else:
                train_in_lockstep(seeded, dirs, progress)
                diverged = set()
            yield {n: summarise(dirs[n], cfg, n in diverged) for n, cfg in seeded.items()}


def train_in_lockstep(
    configs: Mapping[str, RunConfig], run_dirs: Mapping[str, Path], progress: bool = True
) -> None:
    """Train every config into its run directory one step at a time in turn (all need the same
    train.steps)."""
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
                for trainer in trainers.values():
                    trainer.advance()
                logged = {name: t.last_train.get("lm_loss") for name, t in trainers.items()}
                bar.set_postfix({n: f"{loss:.3f}" for n, loss in logged.items() if loss})
                bar.update()
        for trainer in trainers.values():
            trainer.finish()
    finally:
        for trainer in trainers.values():
            trainer.close()


def parallel_threads(n_runs: int) -> int:
    """Threads for each of n_runs processes at once: this process's cores shared out, at least 1."""
    return max(1, len(os.sched_getaffinity(0)) // n_runs)


def run_in_parallel(
    configs: Mapping[str, RunConfig], run_dirs: Mapping[str, Path], progress: bool = True,
    divergence_ends_a_run: bool = False,
) -> set[str]:  # fmt: skip
    """Train every config into its run directory at the same time, each in a process of its own
    with `parallel_threads` threads (unless its train.threads says). The data is prepared (and
    cached) once first. When a run fails or is interrupted, the others are stopped (Ctrl-C: each
    saves a checkpoint first) and `SideBySideFailed` says which. With `divergence_ends_a_run`, a
    run that diverges (`TrainingDiverged`) ends on its own and the others go on: the names of
    those runs are returned (an experiment reports a diverged arm; a comparison cannot)."""
    for name, cfg in configs.items():  # a directory holding a run fails here, before training
        check_run_dir(Path(run_dirs[name]), resume=False, tokenizer=cfg.train.data.tokenizer)
    prepared = set()
    for name, cfg in configs.items():  # each corpus and tokenizer once, before the processes
        key = (cfg.train.data.to_json(), cfg.token_vocab_size)
        if key not in prepared:
            prepare_data(cfg.train.data, cfg.token_vocab_size, progress, Path(run_dirs[name]))
            prepared.add(key)
    for run_dir in run_dirs.values():  # a place that cannot be written: one error, here
        make_dirs(run_dir)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited threads
    processes, listening = {}, {}  # listening: set once the run's Ctrl-C handler is in place
    try:
        with _runs_start_deaf():
            for name, cfg in configs.items():
                threads = cfg.train.threads or parallel_threads(len(configs))
                train_cfg = cfg.train.replace(threads=threads, progress=False)
                listening[name] = context.Event()
                run_dir = str(run_dirs[name])
                args = (cfg.replace(train=train_cfg), run_dir, os.getpid(), listening[name])
                processes[name] = context.Process(target=_train_one, args=args, name=name)
                processes[name].start()
        ended_well = {0, DIVERGED} if divergence_ends_a_run else {0}
        _follow(processes, configs, run_dirs, progress, ended_well)
    finally:
        _stop([(processes[name], listening[name]) for name in processes])
    codes = {name: p.exitcode for name, p in processes.items()}
    if failed := {name: code for name, code in codes.items() if code not in ended_well}:
        said = ", ".join(f"{name} ({_ending(code)})" for name, code in failed.items())
        raise SideBySideFailed(f"training side by side stopped: {said}")
    return {name for name, code in codes.items() if code == DIVERGED}


def _follow(
    processes: dict, configs: Mapping, run_dirs: Mapping, progress: bool, ended_well: set[int]
) -> None:
    """Show the runs' progress until all have ended, or one has failed (an exit code not in
    `ended_well`)."""
    total = sum(cfg.train.steps for cfg in configs.values())
    with tqdm(total=total, desc="side by side", unit="step", file=sys.stderr,
              disable=not progress) as bar:  # fmt: skip
        while True:
            done = {name: _logged_step(Path(run_dirs[name])) for name in configs}
            bar.update(sum(done.values()) - bar.n)
            bar.set_postfix({name: f"step {step}" for name, step in done.items()})
            ended = [p for p in processes.values() if not p.is_alive()]
            if len(ended) == len(processes) or any(p.exitcode not in ended_well for p in ended):
                return
            time.sleep(1.0)


@contextlib.contextmanager
def _runs_start_deaf() -> Iterator[None]:
    """Runs started here ignore Ctrl-C until they listen for it (`_train_one`): a terminal's
    Ctrl-C reaches a run still importing torch, in the terminal's process group, and would end
    it with a traceback; `_stop` passes the Ctrl-C on once it listens (the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by spawned processes
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _stop(runs: Sequence[tuple[multiprocessing.process.BaseProcess, Any]]) -> None:
    """Ask the runs (process, its `listening` event) still going to stop as one Ctrl-C does (a
    checkpoint, then exit; they are in process groups of their own, so a terminal's Ctrl-C reached
    only this process), then wait. A run still starting ignores Ctrl-C (`_runs_start_deaf`, or a
    shell's background job's SIGINT ignored, as in CI): it is waited for until it listens (120 s
    for all at most), or the Ctrl-C would be lost and the run would train to its end unasked."""
    deadline = time.monotonic() + 120
    for p, listening in runs:
        while p.is_alive() and not listening.wait(0.1) and time.monotonic() < deadline:
            pass
        if p.is_alive():
            os.kill(p.pid, signal.SIGINT)
    for p, _ in runs:
        p.join(timeout=120)
        if p.is_alive():
            p.terminate()
            p.join()


INTERRUPTED = 130  # the exit code of a run stopped by Ctrl-C
DIVERGED = 3  # the exit code of a run stopped by TrainingDiverged


def _ending(exitcode: int | None) -> str:
    if exitcode == DIVERGED:
        return "diverged: its loss or gradient became NaN or infinite; its error is above"
    if exitcode == INTERRUPTED:
        return "interrupted: a checkpoint is saved if it had begun training"
    if exitcode is not None and exitcode < 0:
        return f"killed by signal {-exitcode}"
    return f"failed with exit code {exitcode}; its error is above"


def _interrupt_when_parent_dies(parent: int) -> None:
    """A run whose parent (pid `parent`) was killed (SIGKILL, a test's timeout) stops as on Ctrl-C
    instead of training on unseen: Linux's PR_SET_PDEATHSIG; elsewhere the parent's `_stop` is the
    only way. A parent already gone (killed while this process started) counts too. Ctrl-C is
    made to raise KeyboardInterrupt here even where it was ignored (a shell's background job
    inherits SIGINT ignored): the parent stops its runs with it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.platform != "linux":
        return
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGINT)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _train_one(cfg: RunConfig, run_dir: str, parent: int, listening: Any) -> None:
    """One run of `run_in_parallel`, in its own process: sets `listening` once Ctrl-C stops it;
    exits 130 when interrupted, 3 when it diverged, and with a user error as one line (exit 2),
    as `moekit train` would."""
    os.setpgrp()  # a terminal's Ctrl-C reaches only the parent, which passes on exactly one
    try:  # from the moment Ctrl-C raises KeyboardInterrupt here, it exits 130
        _interrupt_when_parent_dies(parent)
        listening.set()
        keep_freed_memory()  # as `moekit train` does; it lasts for this process only
        result = train(cfg, run_dir)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # it has ended: a late stop changes nothing
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:
        print(f"{run_dir}: {err}", file=sys.stderr)
        sys.exit(DIVERGED)
    except KeyboardInterrupt:  # stopped before its training loop (or a second Ctrl-C)
        sys.exit(INTERRUPTED)
    if result.interrupted:
        sys.exit(INTERRUPTED)


def _logged_step(run_dir: Path) -> int:
    """The step of the run's newest training record (0 before the first, or if unreadable)."""
    try:
        records = read_metrics(run_dir / "metrics.jsonl")  # drops a line being written
    except (OSError, ValueError):  # e.g. the run could not make its directory
        return 0
    return next((r["step"] for r in reversed(records) if r["kind"] == "train"), 0)


def run_summary(run_dir: Path, cfg: RunConfig) -> dict[str, Any]:
    """A run's sizes, throughput, final losses, validation curve [[step, loss]] and training
    seconds at each logged step [[step, seconds]] (optimizer steps only: no evaluation)."""
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    ended = max((r["step"] for r in evals), default=0)
    if ended != cfg.train.steps:  # an interrupted run: its ratios would be read off a stub
        raise ValueError(f"{run_dir} ended at step {ended} of {cfg.train.steps}: it is not whole")
    elapsed = itertools.accumulate(r["seconds"] for r in train)
    counts, figures = parameter_breakdown(cfg.model), summary(train, evals)
    return {
        "parameters": counts["total"],
        "active_parameters": counts["active"],
        "tokens_per_s": figures["tokens_per_s"],
        "train_seconds": figures["train_seconds"],
        "final_train_loss": figures["train_loss"],
        "final_val_loss": figures["val_loss"],
        "final_val_bpb": figures["val_bpb"],
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
    seconds to that step over the baseline's whole run: what a user pays), the same-steps time
    ratio (the step ratio times the seconds both runs took for the steps up to it: in lockstep,
    the same moments of the machine, so a load that comes and goes during the run cancels out;
    equal to the time ratio on a quiet machine), the throughput ratio, how far below the
    baseline's final loss it ends, and its own final losses."""
    base = runs[baseline]
    out = {}
    for name, run in runs.items():
        reach = first_step_reaching(run["val_curve"], base["final_val_loss"])
        same_steps = None
        if reach is not None:
            same_steps = reach / steps * seconds_at(run, reach) / seconds_at(base, reach)
        out[name] = {
            "step_ratio": None if reach is None else reach / steps,
            "time_ratio": None if reach is None else seconds_at(run, reach) / base["train_seconds"],
            "time_ratio_same_steps": same_steps,
            "throughput_ratio": run["tokens_per_s"] / base["tokens_per_s"],
            "val_loss_below": base["final_val_loss"] - run["final_val_loss"],
            "final_val_loss": run["final_val_loss"],
            "final_val_bpb": run["final_val_bpb"],
        }
    return out
