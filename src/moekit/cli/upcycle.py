"""`moekit upcycle DENSE_RUN [CONFIG.json] [--n_experts=8 --top_k=2 --noise=0.0] --out RUN_DIR`:
sparse upcycling (`UpcycleConfig`); the resolved config is saved in the new run as
upcycle_config.json (its config.json is the run's)."""

from __future__ import annotations

import argparse

from moekit.cli.common import Command, print_config, resolve_config
from moekit.config import UpcycleConfig
from moekit.fileio import atomic_write_text
from moekit.train.upcycle import upcycle_run

CONFIG_FILE = "upcycle_config.json"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense_run", metavar="DENSE_RUN", help="a run directory of a dense model")
    p.add_argument("--out", required=True, help="the new run directory")


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(UpcycleConfig, args.config, args.overrides)
    print_config(cfg)
    out = upcycle_run(args.dense_run, args.out, cfg.n_experts, cfg.top_k, cfg.noise)
    atomic_write_text(out / CONFIG_FILE, cfg.to_json())
    print(f"upcycled run: {out}\ntrain it with: moekit train --resume {out}")


COMMAND = Command("upcycle", "turn a dense run into an MoE run (sparse upcycling)", configure, run,
                  overrides=True, config=UpcycleConfig)  # fmt: skip
