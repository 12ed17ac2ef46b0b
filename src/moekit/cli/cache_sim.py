"""`moekit cache-sim TRACE [--budget ...] [--policy ...]`: replay a routing trace against cache
policies and Belady's oracle."""

from __future__ import annotations

import argparse
import sys

from moekit.cli.common import Command
from moekit.inference.budget import check_budget_form, resolve_budget
from moekit.inference.cache import POLICIES
from moekit.inference.cache_sim import cache_sim_rows
from moekit.inference.trace import load_trace
from moekit.moe import SELECTED_MAX_TOKENS


def trace_budget(text: str) -> str:
    """A budget of a trace's experts: a count, a fraction or N% (a trace knows no sizes)."""
    try:
        return check_budget_form(text, in_bytes=False)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help="a trace written by moekit trace")
    p.add_argument("--budget", type=trace_budget, nargs="+", default=["100%", "50%", "25%"],
                   help="counts, fractions or N%% of all experts (the minimum, top_k, is "
                   "added)")  # fmt: skip
    p.add_argument("--policy", nargs="+", choices=POLICIES, default=list(POLICIES))


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    if trace.derived:
        print(f"note: {args.trace} predates the record of each layer call's path: calls of at most "
              f"{SELECTED_MAX_TOKENS} tokens count as decode steps; record it again for the "
              "model's exact figures", file=sys.stderr)  # fmt: skip
    ident = trace.identity
    n_total, k = ident["n_layers"] * ident["n_experts"], ident["top_k"]
    caps = sorted({k, *(resolve_budget(b, n_total, None, k) for b in args.budget)}, reverse=True)
    print(f"{len(trace.requests())} requests, {n_total} experts, top_k={k}")
    print("budget  " + "".join(f"{p:>9}" for p in [*args.policy, "belady"]))
    for row in cache_sim_rows(trace, caps, args.policy):
        rates = "".join(f"{row[p]:>9.1%}" for p in [*args.policy, "belady"])
        print(f"{row['budget']:>6}  {rates}")
    return 0


COMMAND = Command("cache-sim", "replay a routing trace against cache policies and Belady's oracle",
                  configure, run)  # fmt: skip
