"""`moekit train [PRESET|CONFIG.json] [--a.b=value ...] [--out RUN_DIR] [--resume RUN_DIR]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moekit.cli.common import DEFAULT_PRESET, Command, print_config, resolve_config
from moekit.config import RunConfig
from moekit.distributed.trainer import train_distributed
from moekit.overrides import apply_overrides
from moekit.train import TrainResult, train
from moekit.train.loop import wants_processes
from moekit.train.report import loss_text
from moekit.train.sample import read_run_config


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help=f"preset or config JSON (default {DEFAULT_PRESET})")
    p.add_argument("--out", help="run directory (default runs/<preset>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")


def run(args: argparse.Namespace) -> None:
    if args.resume:
        if args.config or args.out:
            raise ValueError("--resume RUN_DIR continues that run: give no config and no --out")
        run_dir = Path(args.resume)
        cfg = apply_overrides(read_run_config(run_dir), args.overrides)
    else:
        cfg = resolve_config(RunConfig, args.config, args.overrides)
        run_dir = Path(args.out or default_run_dir(args.config))
    print_config(cfg)
    trainer = train_distributed if wants_processes(cfg) else train  # torchrun, or parallel.ep/dp
    print_result(trainer(cfg, run_dir, resume=bool(args.resume)))


def default_run_dir(spec: str | None) -> str:
    name = Path(spec).stem if spec and spec.endswith(".json") else (spec or DEFAULT_PRESET)
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_result(result: TrainResult) -> None:
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}; checkpoint {result.checkpoint}")
        print(f"continue with: moekit train --resume {result.run_dir}")
    print(
        f"\nstep {result.step}: train loss {loss_text(result.train_loss)}, "
        f"validation loss {loss_text(result.val_loss)} ({loss_text(result.val_bpb)} bits/byte), "
        f"{result.tokens_per_s:,.0f} tokens/s"
    )
    print(f"report: {result.run_dir / 'report.md'}")


COMMAND = Command("train", "train a model on the built-in corpus (or any text) and write a run "
                  "directory", configure, run, overrides=True, trains=True)  # fmt: skip
