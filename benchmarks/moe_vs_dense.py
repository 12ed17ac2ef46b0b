"""MoE versus dense at the same active parameters: `small` against `dense-small`.

Both models train with the same training settings (the `small` preset's), the same seed, hence the
same initial RNG state and the same batches in the same order, for the same number of steps. They
train in lockstep in one process, one optimizer step of each in turn, so both see the same machine
load and their throughputs compare side by side (DESIGN.md convention 12). Both are evaluated on
the same validation windows at the same steps.

Reported: the validation-loss curves (one plot), the first evaluated step at which the MoE model's
validation loss reaches the dense model's final one, and both training throughputs (tokens/s of
the optimizer steps, evaluation and checkpoints excluded). Targets (issue 3): MoE reaches dense's
final validation loss in at most 0.6 x the steps, at a throughput of at least 0.85 x dense's.

    python benchmarks/moe_vs_dense.py                 # the demo's steps; ~2 x the demo's time
    python benchmarks/moe_vs_dense.py --steps 40      # a quick look
    python benchmarks/moe_vs_dense.py --steps 1200 --evals 30 \
        --out benchmarks/results/moe_vs_dense_1200.json   # 3x the horizon, ~38 min
    python benchmarks/moe_vs_dense.py --model.moe.n_experts=16 --model.moe.top_k=3 \
        --model.moe.d_expert=256 --model.moe.n_shared_experts=1 --model.moe.d_shared=256 \
        --out benchmarks/results/moe_vs_dense_finegrained.json   # another MoE design
    python benchmarks/moe_vs_dense.py --model.moe.router=hash \
        --out benchmarks/results/moe_vs_dense_hash.json   # routed by a hash of the token id

Prints the JSON to stdout (progress goes to stderr), writes it to
benchmarks/results/moe_vs_dense.json and the plot beside it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import moekit
from moekit.cli.common import results_file
from moekit.config import RunConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.fileio import atomic_write_json, save_figure
from moekit.machine import machine_info as machine
from moekit.overrides import apply_overrides
from moekit.train.lockstep import (
    compare_to,
    first_step_reaching,
    lockstep_settings,
    train_designs,
)
from moekit.train.report import VAL_LOSS, curves_figure

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("small", "dense-small")
TARGET_STEP_RATIO = 0.6
TARGET_THROUGHPUT_RATIO = 0.85


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="default: the small preset's steps")
    p.add_argument("--evals", type=int, default=20, help="evaluations over the run")
    p.add_argument("--out", type=results_file, default=RESULTS_DIR / "moe_vs_dense.json")
    p.add_argument(
        "--malloc",
        default="keep",
        choices=["keep", "glibc"],
        help="keep: reuse freed memory as `moekit train` does (default); glibc: the C defaults",
    )
    p.add_argument("--cache-dir", default=None, help="tokenizer/data cache (default: moekit's)")
    args, extra = p.parse_known_args(argv)
    # Any other argument is an override of the MoE model's config only, to measure another design
    # against the same dense model: e.g. --model.moe.n_experts=16 --model.moe.top_k=3 ...
    if bad := [a for a in extra if not a.startswith("--model.moe.")]:
        p.error(f"unrecognized arguments: {' '.join(bad)} (overrides must be --model.moe.*)")
    args.moe_overrides = extra
    return args


def run_configs(args: argparse.Namespace) -> dict[str, RunConfig]:
    """The two runs: each model preset with the training settings of `small`."""
    base = RunConfig.preset("small").train
    train = lockstep_settings(base, args.steps or base.steps, args.evals)
    train = train.replace(data=base.data.replace(cache_dir=args.cache_dir))
    configs = {name: RunConfig(model=RunConfig.preset(name).model, train=train) for name in MODELS}
    configs["small"] = apply_overrides(configs["small"], args.moe_overrides)
    return configs


def compare(runs: dict[str, dict[str, Any]], steps: int) -> dict[str, Any]:
    moe, dense = runs["small"], runs["dense-small"]
    row = compare_to(runs, "dense-small", steps)["small"]
    step_ratio, throughput_ratio = row["step_ratio"], row["throughput_ratio"]
    reach = None if step_ratio is None else round(step_ratio * steps)
    # For every evaluated dense loss, the first step at which MoE reached it: the step ratio along
    # the run, not only at its end (how the advantage develops with training).
    along = [
        [step, first_step_reaching(moe["val_curve"], loss)] for step, loss in dense["val_curve"]
    ]
    return {
        "moe_step_reaching_each_dense_eval": along,
        "dense_final_val_loss": dense["final_val_loss"],
        "moe_step_reaching_dense_final": reach,
        "step_ratio": step_ratio,
        "throughput_ratio": throughput_ratio,
        "targets": {
            f"step_ratio <= {TARGET_STEP_RATIO}": step_ratio is not None
            and step_ratio <= TARGET_STEP_RATIO,
            f"throughput_ratio >= {TARGET_THROUGHPUT_RATIO}": throughput_ratio
            >= TARGET_THROUGHPUT_RATIO,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    cmp, runs = result["comparison"], result["runs"]
    labels = {name: f"{name} ({run['active_parameters'] / 1e6:.2f}M active, "
              f"{run['parameters'] / 1e6:.2f}M total; {run['tokens_per_s']:,.0f} tok/s)"
              for name, run in runs.items()}  # fmt: skip
    ratio = "never" if cmp["step_ratio"] is None else f"{cmp['step_ratio']:.2f} x the steps"
    title = (f"Validation loss: MoE reaches dense's final loss at {ratio}; "
             f"throughput {cmp['throughput_ratio']:.2f} x dense")  # fmt: skip
    curves = {name: run["val_curve"] for name, run in runs.items()}
    fig = curves_figure(curves, "optimizer step", VAL_LOSS, title, "dense-small", labels)
    if cmp["moe_step_reaching_dense_final"] is not None:
        fig.axes[0].axvline(cmp["moe_step_reaching_dense_final"], color="gray", ls=":", lw=1)
    m = result["machine"]
    fig.text(0.01, 0.005, f"{m['cpu_model']}, {m['torch_threads']} threads, torch {m['torch']}",
             fontsize=7, color="gray")  # fmt: skip
    save_figure(fig, path)


def machine_info() -> dict[str, Any]:
    return {
        **machine(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "moekit": moekit.__version__,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print and write the JSON (and the PNG beside it); return it."""
    args = parse_args(argv)
    if args.malloc == "keep":
        keep_freed_memory()  # as the training commands do; lasts for the process
    configs = run_configs(args)
    started = time.perf_counter()
    machine = machine_info()
    (runs,) = train_designs(configs)
    machine["loadavg_end"] = list(os.getloadavg())
    steps = configs["small"].train.steps
    result = {
        "benchmark": "moe_vs_dense",
        "machine": machine,
        "steps": steps,
        "malloc": args.malloc,
        "moe_overrides": args.moe_overrides,
        "tokens_per_step": configs["small"].train.batch_size * configs["small"].train.seq_len,
        "train": configs["small"].train.to_dict(),
        "runs": runs,
        "comparison": compare(runs, steps),
        "wall_seconds": time.perf_counter() - started,
    }
    print(atomic_write_json(args.out, result))
    plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
