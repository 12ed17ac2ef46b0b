"""`moekit params PRESET|CONFIG.json [--model.a=value ...] [--ep N]`: a model's parameters."""

from __future__ import annotations

import argparse

from moekit.cli.common import Command, positive_int, resolve_config
from moekit.config import MODEL_PRESETS, ModelConfig, RunConfig
from moekit.distributed.traffic import traffic_table
from moekit.model import parameter_table
from moekit.overrides import apply_overrides


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="PRESET|CONFIG.json", help="model preset or config JSON")
    p.add_argument("--ep", type=positive_int, metavar="N",
                   help="also print the bytes per token per MoE layer that expert parallelism "
                   "over N processes sends per training step")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.config in MODEL_PRESETS:  # the model preset itself, not its training run's variant
        overrides = [model_override(o) for o in args.overrides]
        cfg = apply_overrides(ModelConfig.preset(args.config), overrides)
    else:
        cfg = resolve_config(RunConfig, args.config, args.overrides).model
    traffic = None if args.ep is None else traffic_table(cfg, args.ep)
    print(parameter_table(cfg, title=f"{args.config}: parameters"))
    if traffic is not None:
        print(f"\n{traffic}")
    return 0


def model_override(item: str) -> str:
    """ "--model.a=v" -> "--a=v" (params takes model keys only)."""
    if not item.startswith("--model."):
        raise ValueError(f"params takes model overrides only (--model.key=value), not {item!r}")
    return "--" + item[len("--model.") :]


COMMAND = Command("params", "print a model's parameters: total, active per token, and by part",
                  configure, run, overrides=True)  # fmt: skip
