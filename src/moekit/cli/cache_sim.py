"""`moekit cache-sim TRACE [CONFIG.json] [--budget=100%,50%,25%] [--policy=lru,lfu,static]`: replay
a routing trace against cache policies and Belady's oracle (`CacheSimConfig`); it prints its
resolved config and the hit rates and writes nothing."""

from __future__ import annotations

import argparse
import sys

from moekit.cli.common import Command, print_config, resolve_config
from moekit.config import CacheSimConfig
from moekit.inference.budget import budget_count, check_budget_form, resolve_budget
from moekit.inference.cache_sim import cache_sim_rows
from moekit.inference.trace import load_trace
from moekit.moe import SELECTED_MAX_TOKENS


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", metavar="TRACE", help="a trace written by moekit trace")


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(CacheSimConfig, args.config, args.overrides)
    for budget in cfg.budget:  # before the trace is read; a trace knows no sizes in bytes
        check_budget_form(budget, in_bytes=False)
    print_config(cfg)
    trace = load_trace(args.trace)
    if trace.derived:
        print(f"note: {args.trace} predates the record of each layer call's path: calls of at most "
              f"{SELECTED_MAX_TOKENS} tokens count as decode steps; record it again for the "
              "model's exact figures", file=sys.stderr)  # fmt: skip
    ident = trace.identity
    n_total, k = ident["n_layers"] * ident["n_experts"], ident["top_k"]
    caps = sorted({k, *(resolve_budget(b, n_total, None, k) for b in cfg.budget)}, reverse=True)
    over = [b for b in cfg.budget if budget_count(b, n_total, None) > n_total]  # counts
    if over:
        print(f"note: --budget {', '.join(over)} {'is' if len(over) == 1 else 'are'} more than "
              f"the trace's {n_total} experts: a cache of all of them ({n_total}) stands for "
              f"{'it' if len(over) == 1 else 'them'}", file=sys.stderr)  # fmt: skip
    policies = list(cfg.policy)
    print(f"{len(trace.requests())} requests, {n_total} experts, top_k={k}")
    print("budget  " + "".join(f"{p:>9}" for p in [*policies, "belady"]))
    for row in cache_sim_rows(trace, caps, policies):
        rates = "".join(f"{row[p]:>9.1%}" for p in [*policies, "belady"])
        print(f"{row['budget']:>6}  {rates}")


COMMAND = Command("cache-sim", "replay a routing trace against cache policies and Belady's oracle",
                  configure, run, overrides=True, config=CacheSimConfig)  # fmt: skip
