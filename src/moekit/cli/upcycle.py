"""`moekit upcycle DENSE_RUN --out RUN_DIR [--experts N --top-k K --noise S]`: sparse upcycling."""

from __future__ import annotations

import argparse

from moekit.cli.common import Command, non_negative_float, positive_int
from moekit.train.upcycle import upcycle_run


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense_run", metavar="DENSE_RUN", help="a run directory of a dense model")
    p.add_argument("--experts", type=positive_int, default=8, help="experts per layer (FFN copies)")
    p.add_argument("--top-k", type=positive_int, default=2)
    p.add_argument("--noise", type=non_negative_float, default=0.0,
                   help="expert noise, times each weight's std")  # fmt: skip
    p.add_argument("--out", required=True, help="the new run directory")


def run(args: argparse.Namespace) -> int:
    out = upcycle_run(args.dense_run, args.out, args.experts, args.top_k, args.noise)
    print(f"upcycled run: {out}\ntrain it with: moekit train --resume {out}")
    return 0


COMMAND = Command("upcycle", "turn a dense run into an MoE run (sparse upcycling)", configure, run)
