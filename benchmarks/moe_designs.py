"""Which MoE design learns fastest per step against dense, at equal active parameters.

`moe_vs_dense.py` measures one design (`small`) against `dense-small`; this one trains several MoE
designs and the dense model in lockstep (one optimizer step of each in turn: same machine load,
same seed, same batches in the same order) at one base run, for one or more seeds, and reports for
each design the step ratio of issue 3: the first evaluated step at which its validation loss
reaches the dense model's final one, over the steps (lower is better; 1.0 = no faster than dense;
null = never; its resolution is the evaluation interval, steps / evals). Designs are overrides of
the base run; the default ones keep the active expert width A = top_k * d_expert + shared width of
the base (512 for the `experiment` preset; A must divide by 4), and the run stops before training
if a design's differs from the dense model's d_ff. They suit a base whose layers are all MoE with
softmax top-k routing (hash routing takes no groups and no bias balancing):

    dense               a dense SwiGLU FFN of width A
    top2                E experts of A / 2, learned top-2, no shared expert (`small`'s layout; the
                        base's scores, balance losses and other router settings)
    top2-frozen-router  the same, the router left at its random initial weights
    top2-16-experts     16 experts of A / 2, top-2 (twice the expert parameters of an 8-expert base)
    sigmoid-aux-free    top-2, sigmoid scores, aux-loss-free bias balancing (DeepSeek-V3)
    fine-grained+shared 2E experts of A / 4, top-3, one shared expert of A / 4 (DeepSeekMoE)
    hash-top2           top-2 of E experts of A / 2 chosen by a fixed hash of the token id (Roller
                        2021): the base design's parameters, no learned router
    hash-top1-wide      top-1 of E experts of width A, hashed: E times the dense FFN's parameters

    python benchmarks/moe_designs.py --seeds 2 --set=--train.eval.batches=8   # ~16 min a seed
    python benchmarks/moe_designs.py --steps 40 --out /tmp/designs.json   # a quick look
    python benchmarks/moe_designs.py --steps 1200 --evals 24 --only dense,top2,hash-top2 \
        --set=--train.eval.batches=8 --out benchmarks/results/moe_designs_1200.json
    python benchmarks/moe_designs.py --preset small --designs mine.json   # {"dense": [...], ...}

Prints the JSON to stdout (progress to stderr), writes it to
benchmarks/results/moe_designs.json and the plot of the first seed's curves beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_vs_dense import machine_info
from moekit.cli.common import results_file
from moekit.config import RunConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.fileio import atomic_write_json, save_figure
from moekit.overrides import apply_overrides
from moekit.train.lockstep import (
    compare_to,
    design_configs,
    lockstep_settings,
    train_designs,
)
from moekit.train.report import VAL_LOSS, curves_figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DENSE = "dense"


def default_designs(base: RunConfig) -> dict[str, list[str]]:
    """The designs of the module docstring, sized from the base run's MoE layer."""
    moe = base.model.moe
    if moe is None:
        raise SystemExit("the base run needs an MoE model (model.moe set)")
    e, a, m = moe.n_experts, moe.active_width, "--model.moe."
    unshared = [f"{m}n_shared_experts=0", f"{m}d_shared=null", f"{m}shared_gate=false"]
    half = [f"{m}top_k=2", f"{m}d_expert={a // 2}", *unshared]
    return {
        DENSE: ["--model.moe=null", f"--model.d_ff={a}"],
        "top2": half,
        "top2-frozen-router": [*half, "--train.freeze=router"],
        "top2-16-experts": [*half, f"{m}n_experts=16"],
        "sigmoid-aux-free": [
            *half,
            f"{m}score=sigmoid",
            f"{m}aux_loss_coef=0",
            f"{m}bias_update_rate=0.001",
        ],
        "fine-grained+shared": [
            f"{m}n_experts={2 * e}",
            f"{m}top_k=3",
            f"{m}d_expert={a // 4}",
            f"{m}n_shared_experts=1",
            f"{m}d_shared={a // 4}",
        ],
        "hash-top2": [*half, f"{m}router=hash"],
        "hash-top1-wide": [
            f"{m}router=hash",
            f"{m}top_k=1",
            f"{m}d_expert={a}",
            *unshared,
        ],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="experiment", help="the base run (default: experiment)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="--a.b=VALUE",
        help="an override of the base run, for every design (repeatable)",
    )
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--evals", type=int, default=16, help="evaluations over the run")
    p.add_argument("--seeds", type=int, default=1, help="seeds train.seed + 0..N-1")
    p.add_argument(
        "--designs",
        type=Path,
        default=None,
        help='a JSON file {"name": ["--model.moe.x=...", ...]}; needs a "dense" entry',
    )
    p.add_argument("--only", default=None, metavar="NAME,NAME",
                   help="a subset of the designs (and dense)")  # fmt: skip
    p.add_argument("--out", type=results_file, default=RESULTS_DIR / "moe_designs.json")
    return p.parse_args(argv)


def base_config(args: argparse.Namespace) -> RunConfig:
    base = apply_overrides(RunConfig.preset(args.preset), args.set)
    return base.replace(train=lockstep_settings(base.train, args.steps, args.evals))


def designs(args: argparse.Namespace, base: RunConfig) -> dict[str, list[str]]:
    chosen = default_designs(base) if args.designs is None else json.loads(args.designs.read_text())
    return choose_designs(chosen, args.only)


def choose_designs(designs: dict[str, list[str]], only: str | None) -> dict[str, list[str]]:
    """All `designs`, or the comma-separated names `only` and dense (first), which the others
    are measured by."""
    if DENSE not in designs:
        raise SystemExit(
            f'the designs need a "{DENSE}" entry: the model the others are measured by'
        )
    names = list(designs) if only is None else [DENSE, *only.split(",")]
    if unknown := [name for name in names if name not in designs]:
        raise SystemExit(f"unknown designs {unknown}; choose from {', '.join(designs)}")
    return {name: designs[name] for name in dict.fromkeys(names)}


def check_widths(configs: dict[str, RunConfig]) -> dict[str, RunConfig]:
    """`configs`; exit unless every MoE design's active expert width equals dense's d_ff."""
    width = configs[DENSE].model.d_ff
    for name, cfg in configs.items():
        moe = cfg.model.moe
        if moe is not None and moe.active_width != width:
            raise SystemExit(
                f"design {name!r} has an active expert width of {moe.active_width} (top_k * "
                f"d_expert + shared width), the dense model's d_ff is {width}: resize one of them"
            )
    return configs


def seed_table(compared: list[dict[str, dict[str, Any]]], keys: tuple[str, ...]) -> dict:
    """Per design, each of `keys` of its `compare_to` rows, one per seed: KEY_per_seed (the
    seeds' values) and KEY_mean (None when a seed has none: a design that never reached it)."""
    table: dict[str, dict[str, Any]] = {}
    for name in compared[0]:
        for key in keys:
            values = [seed[name][key] for seed in compared]
            table.setdefault(name, {})[f"{key}_per_seed"] = values
            table[name][f"{key}_mean"] = None if None in values else mean(values)
    return table


def summarise(per_seed: list[dict[str, dict[str, Any]]], steps: int) -> dict[str, Any]:
    """Each design's step ratio and throughput ratio against the same seed's dense run."""
    keys = ("step_ratio", "throughput_ratio", "final_val_loss", "val_loss_below")
    table = seed_table([compare_to(runs, DENSE, steps) for runs in per_seed], keys)
    return {name: {"step_ratio_per_seed": row["step_ratio_per_seed"],
                   "step_ratio_mean": row["step_ratio_mean"],
                   "throughput_ratio": row["throughput_ratio_mean"],
                   "final_val_loss_per_seed": row["final_val_loss_per_seed"],
                   "val_loss_below_dense_per_seed": row["val_loss_below_per_seed"],
                   "parameters": per_seed[0][name]["parameters"],
                   "active_parameters": per_seed[0][name]["active_parameters"]}
            for name, row in table.items()}  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    runs = result["runs"][0]
    labels = {}
    for name, run in runs.items():
        ratio = result["designs"][name]["step_ratio_per_seed"][0]
        shown = "never" if ratio is None else f"{ratio:.3f}"
        labels[name] = f"{name}: {run['parameters'] / 1e6:.2f}M total, step ratio {shown}"
    title = (f"MoE designs vs dense at {result['active_parameters'] / 1e6:.2f}M active "
             f"parameters (seed {result['seed']}): validation loss")  # fmt: skip
    curves = {name: run["val_curve"] for name, run in runs.items()}
    save_figure(curves_figure(curves, "optimizer step", VAL_LOSS, title, DENSE, labels), path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and write the JSON (and the PNG beside it); return it."""
    args = parse_args(argv)
    keep_freed_memory()  # as the training commands do; lasts for the process
    base = base_config(args)
    chosen = designs(args, base)
    configs = check_widths(design_configs(base, chosen))
    started, machine = time.perf_counter(), machine_info()
    per_seed = list(train_designs(configs, args.seeds))
    result = {
        "benchmark": "moe_designs",
        "machine": machine,
        "preset": args.preset,
        "base_overrides": args.set,
        "steps": args.steps,
        "eval_every": base.train.eval.every,
        "seed": base.train.seed,
        "seeds": args.seeds,
        "tokens_per_step": base.train.batch_size * base.train.seq_len * base.train.grad_accum,
        "active_parameters": per_seed[0][DENSE]["active_parameters"],
        "design_overrides": chosen,
        "designs": summarise(per_seed, args.steps),
        "base": base.to_dict(),
        "runs": per_seed,
        "wall_seconds": time.perf_counter() - started,
    }
    machine["loadavg_end"] = list(os.getloadavg())
    print(atomic_write_json(args.out, result))
    plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
