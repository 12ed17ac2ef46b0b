"""`moekit experiment NAME [--preset PRESET|CONFIG.json] [--seeds N] [--a.b=value ...]`: a
paper's arms trained side by side, with the measured direction."""

from __future__ import annotations

import argparse
import shlex

from moekit.cli.common import Command, positive_int, print_config, resolve_config
from moekit.config import RunConfig
from moekit.experiments import runner
from moekit.experiments.arms import EXPERIMENTS
from moekit.fileio import check_own_folder
from moekit.train.device import training_device


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME", choices=list(EXPERIMENTS), help=", ".join(EXPERIMENTS))
    p.add_argument(
        "--preset",
        default="experiment",
        help="base run preset (or config JSON) of every arm (default experiment: each experiment "
        "takes 9-12 minutes on 2 idle CPU cores, by its arms' CPU time, with its own train.steps); "
        "scale up with another preset (e.g. small) or overrides such as --train.steps=2000 "
        "--model.n_layers=8",
    )
    p.add_argument("--seeds", type=positive_int, default=1, help="repeat each arm with N seeds")
    p.add_argument("--out", help="report folder (default runs/experiments/NAME); runs in OUT/arms")


def run(args: argparse.Namespace) -> None:
    out = args.out or f"runs/experiments/{args.name}"
    # a run's own report.md, say; an experiment's folder (its arms' runs too) it goes on with
    check_own_folder(out, (runner.RESULTS_FILE, runner.ARMS_DIR), "an experiment")
    base = resolve_config(RunConfig, args.preset, [])
    if args.preset == "experiment":  # each experiment's steps fit its arms in the time budget
        base = base.replace(train=base.train.replace(steps=EXPERIMENTS[args.name].steps))
    shown = runner.experiment_base(args.name, base, args.overrides)
    training_device(shown.train.device)  # in this process, before an arm's process fails on it
    if shown.train.seed + args.seeds > 2**64:  # the seeds are train.seed + 0 .. seeds - 1
        raise ValueError(
            f"--seeds={args.seeds} from train.seed={shown.train.seed} runs past the largest seed "
            f"(2**64 - 1): give at most {2**64 - shown.train.seed} seeds or a smaller train.seed"
        )
    print_config(shown)
    command = shlex.join(["moekit", "experiment", args.name, "--preset", args.preset,
                          "--seeds", str(args.seeds), "--out", out, *args.overrides])  # fmt: skip
    report = runner.run_experiment(args.name, base, out, args.seeds, args.overrides, command)
    print(f"report: {report}")


STEPS = sorted({experiment.steps for experiment in EXPERIMENTS.values()})
STEPS_TEXT = str(STEPS[0]) if len(STEPS) == 1 else f"{STEPS[0]}-{STEPS[-1]}"
COMMAND = Command("experiment", "train a paper's arms side by side and report the measured "
                  "direction", configure, run, overrides=True, preset="experiment", trains=True,
                  own=(("train.steps", f"<each experiment's own, {STEPS_TEXT}>"),))  # fmt: skip
