"""When MoE pays: step and wall-clock ratio to dense's final loss against tokens per parameter.

An MoE adds parameters at the same compute per token; that capacity can only show once a model is
limited by its capacity rather than by optimisation, i.e. once it has seen many tokens per
parameter. This study holds the compute of each run fixed (`--compute`, tokens x active
parameters) and spends it at several budgets B of training tokens per active parameter: the model
shrinks as B grows (width d_model, chosen so that the dense model's active parameters, embeddings
included, are about sqrt(compute / B)) and the run lengthens (steps = B x active / tokens a step).

At each budget, dense and three MoE designs of equal active expert width A = 4 d_model train in
lockstep (one optimizer step of each in turn: same batches, same seed, same machine load):

    dense          a dense SwiGLU FFN of width A
    top2-8         8 experts of A / 2, learned top-2 (coarse; `small`'s layout)
    top2-32        32 experts of A / 2, top-2 (many experts: 4x the expert parameters of top2-8)
    fine-grained   64 experts of A / 8, top-7, one shared expert of A / 8 (DeepSeekMoE)

For each design and seed it reports the step ratio (the first evaluated step whose validation loss
reaches dense's final one, over the steps; its resolution is steps / evals), the wall-clock ratio
(the training seconds to that step over dense's whole run, both timed in the same lockstep run:
what a user pays), the loss below dense and the throughput ratio. The base run is the `experiment`
preset (2048-token BPE over the standard library, 16 x 128 tokens a step) with 2 layers of 2 heads.

    python benchmarks/moe_scaling.py                              # 5 budgets x 2 seeds
    python benchmarks/moe_scaling.py --budgets 30 --seeds 1       # one point
    python benchmarks/moe_scaling.py --compute 2e10 --budgets 1,10 --out /tmp/s.json  # quick look
    python benchmarks/moe_scaling.py --merge a.json b.json  # budgets run apart, as one study

Prints the JSON to stdout (progress to stderr), writes it to benchmarks/results/moe_scaling.json
and the plot of step and time ratio against tokens per parameter beside it.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_designs import DENSE, check_widths, choose_designs, seed_table
from moe_vs_dense import machine_info
from moekit.cli.common import results_file
from moekit.config import RunConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.fileio import atomic_write_json, save_figure
from moekit.model import parameter_breakdown
from moekit.overrides import apply_overrides
from moekit.train.lockstep import compare_to, design_configs, lockstep_settings, train_designs

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BUDGETS = (1, 3, 10, 30, 100)
# tokens x active parameters of every run: 30 tokens per parameter at the 262K-parameter model
# (d_model 64) that the issue measured, ~4,000 steps of 2,048 tokens.
COMPUTE = 2.06e12
WIDTH_STEP = 8  # d_model is a multiple of this: A / 8 and the 2 heads' widths stay whole
BASE = ["--model.n_layers=2", "--model.n_heads=2"]


def designs(d_model: int) -> dict[str, list[str]]:
    """The four designs of the module docstring at width d_model (active expert width 4 d)."""
    a, m = 4 * d_model, "--model.moe."
    shape = [f"--model.d_model={d_model}", f"{m}d_model={d_model}"]
    unshared = [f"{m}n_shared_experts=0", f"{m}d_shared=null", f"{m}shared_gate=false"]
    top2 = [*shape, f"{m}top_k=2", f"{m}d_expert={a // 2}", *unshared]
    return {
        DENSE: [*shape, "--model.moe=null", f"--model.d_ff={a}"],
        "top2-8": [*top2, f"{m}n_experts=8"],
        "top2-32": [*top2, f"{m}n_experts=32"],
        "fine-grained": [
            *shape,
            f"{m}n_experts=64",
            f"{m}top_k=7",
            f"{m}d_expert={a // 8}",
            f"{m}n_shared_experts=1",
            f"{m}d_shared={a // 8}",
        ],
    }


def dense_active(base: RunConfig, d_model: int) -> int:
    """Active parameters (embeddings included) of the dense design at width d_model."""
    cfg = apply_overrides(base, designs(d_model)[DENSE]).model
    return parameter_breakdown(cfg)["active"]


def size_for(base: RunConfig, budget: float, compute: float, tokens_per_step: int) -> dict:
    """The width whose dense model is closest (in log) to sqrt(compute / budget) active
    parameters, and the steps that give it `budget` tokens per active parameter."""
    target = math.sqrt(compute / budget)
    widths = range(WIDTH_STEP, 1025, WIDTH_STEP)
    # the active parameters grow with the width: the closest is one of the two around the target
    at = bisect.bisect_left(widths, target, key=lambda w: dense_active(base, w))
    near = widths[max(at - 1, 0) : at + 1]
    d = min(near, key=lambda w: abs(math.log(dense_active(base, w) / target)))
    active = dense_active(base, d)
    steps = max(1, round(budget * active / tokens_per_step))
    return {"budget": budget, "d_model": d, "active_parameters": active, "steps": steps,
            "tokens_per_active_parameter": steps * tokens_per_step / active}  # fmt: skip


RATIOS = ("step_ratio", "time_ratio", "time_ratio_same_steps", "throughput_ratio", "val_loss_below")


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget and design: the per-seed figures side by side, and their means."""
    tables = [(p["size"]["budget"], seed_table([s["designs"] for s in p["seeds"]], RATIOS))
              for p in points]  # fmt: skip
    return [{"budget": budget, "design": name, **row}
            for budget, table in tables for name, row in table.items()]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)),
                   help="tokens per active parameter, comma-separated")  # fmt: skip
    p.add_argument("--compute", type=float, default=COMPUTE,
                   help="tokens x active parameters of every run")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2, help="seeds train.seed + 0..N-1")
    p.add_argument("--evals", type=int, default=20, help="evaluations over each run")
    p.add_argument("--only", default=None, metavar="NAME,NAME", help="a subset of the designs")
    p.add_argument("--set", action="append", default=[], metavar="--a.b=VALUE",
                   help="an override of the base run, for every design (repeatable)")  # fmt: skip
    p.add_argument("--out", type=results_file, default=RESULTS_DIR / "moe_scaling.json")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="train nothing: join studies of other budgets (same compute, base, "
                   "designs; e.g. run at once on two cores) into --out and its plot")  # fmt: skip
    args = p.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"argument --budgets: expected numbers like 1,3,10, got {args.budgets!r}")
    if any(b <= 0 for b in args.budgets) or args.compute <= 0 or args.seeds < 1:
        p.error("--budgets, --compute and --seeds must be positive")
    return args


def run_point(base: RunConfig, args: argparse.Namespace, size: dict) -> dict[str, Any]:
    """Every design at one budget, for every seed, in lockstep."""
    sized = base.replace(train=lockstep_settings(base.train, size["steps"], args.evals))
    chosen = choose_designs(designs(size["d_model"]), args.only)
    configs = check_widths(design_configs(sized, chosen))
    seeds, started = [], time.perf_counter()
    for s, runs in enumerate(train_designs(configs, args.seeds)):
        compared = compare_to(runs, DENSE, size["steps"])
        seeds.append({"seed": base.train.seed + s, "designs": compared, "runs": runs,
                      "wall_seconds": time.perf_counter() - started})  # fmt: skip
        print(f"budget {size['budget']:g} seed {s}: {_line(compared)}", file=sys.stderr, flush=True)
        started = time.perf_counter()
    return {"size": size, "design_overrides": chosen, "seeds": seeds}


def _line(designs: dict[str, dict[str, Any]]) -> str:
    def show(x: float | None) -> str:
        return "never" if x is None else f"{x:.2f}"

    return "; ".join(
        f"{n} steps {show(d['step_ratio'])} time {show(d['time_ratio'])}"
        for n, d in designs.items()
        if n != DENSE
    )


def plot(result: dict[str, Any], path: Path) -> None:
    fig = Figure(figsize=(14, 4.5), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    rows = [r for r in result["summary"] if r["design"] != DENSE]
    titles = {"step_ratio": "steps to dense's final loss", "time_ratio": "training time to it",
              "time_ratio_same_steps": "time to it, timed over the same steps"}  # fmt: skip
    for ax, (key, title) in zip(axes, titles.items(), strict=True):
        for name in dict.fromkeys(r["design"] for r in rows):
            points = [
                (r["budget"], v)
                for r in rows
                if r["design"] == name
                for v in r[f"{key}_per_seed"]
                if v is not None
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "o", ms=4, label=name)
                means = [(r["budget"], r[f"{key}_mean"]) for r in rows
                         if r["design"] == name and r[f"{key}_mean"] is not None]  # fmt: skip
                if means:
                    ax.plot(*zip(*means, strict=True), "-", lw=1, color=ax.lines[-1].get_color())
        ax.axhline(1.0, color="black", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens per active parameter")
        ax.set_title(f"MoE / dense: {title}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("ratio to dense (below 1: MoE is ahead)")
    axes[0].legend(fontsize=8)
    m = result["machine"]
    threads = result["base"]["train"]["threads"] or m["torch_threads"]
    fig.suptitle(f"{m['cpu_model']}, {threads} threads; points: seeds, lines: means, "
                 "never reached: not drawn", fontsize=8, color="gray")  # fmt: skip
    save_figure(fig, path)


def merge(paths: list[Path]) -> dict[str, Any]:
    """One study from studies run apart (other budgets, or other seeds of a budget: e.g. at once
    on two cores) with the same compute, base and evaluations: their points in budget order, the
    seeds of a budget joined, each part's machine and wall time kept under "parts"."""
    parts = [_read_study(path) for path in paths]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        if _study_key(part) != _study_key(parts[0]):
            raise SystemExit(
                f"{path} is not the same study as {paths[0]}: its compute, base config (seed "
                "aside), tokens per step, evaluations or designs differ"
            )
    by_budget: dict[float, dict[str, Any]] = {}
    for point in (p for part in parts for p in part["points"]):
        for seed in point["seeds"]:  # the figures of today's compare_to, from the runs' curves
            seed["designs"] = compare_to(seed["runs"], DENSE, point["size"]["steps"])
        joined = by_budget.setdefault(point["size"]["budget"], {**point, "seeds": []})
        seeds = [s["seed"] for s in joined["seeds"]]
        if any(s["seed"] in seeds for s in point["seeds"]):
            raise SystemExit(f"{', '.join(map(str, paths))} measure budget "
                             f"{point['size']['budget']:g} with the same seed twice")  # fmt: skip
        joined["seeds"] = sorted([*joined["seeds"], *point["seeds"]], key=lambda s: s["seed"])
    points = [by_budget[b] for b in sorted(by_budget)]
    kept = ("machine", "wall_seconds")
    return {**{key: parts[0][key] for key in ("benchmark", "machine", *STUDY)},
            "wall_seconds": sum(part["wall_seconds"] for part in parts),
            "summary": summarise(points), "points": points,
            "parts": [piece for path, part in zip(paths, parts, strict=True)
                      for piece in part.get("parts") or [  # a joined study brings its own parts
                          {"file": path.name,
                           "budgets": [p["size"]["budget"] for p in part["points"]],
                           "seeds": sorted({s["seed"] for p in part["points"] for s in p["seeds"]}),
                           **{key: part[key] for key in kept}}]]}  # fmt: skip


STUDY = ("compute", "base_overrides", "tokens_per_step", "evals", "base")


def _study_key(study: dict[str, Any]) -> tuple:
    """What studies must share to be joined: compute, tokens per step, evaluations, the designs,
    and the config each design trains with (read through RunConfig, so configs written by older
    versions compare by their values) less what every point sets itself: width, steps, seed and
    the settings `lockstep_settings` derives from the steps."""
    base = RunConfig.from_dict(study["base"])
    base = base.replace(train=lockstep_settings(base.train.replace(seed=0), 1, study["evals"]))
    trained = {
        name: _as_trained(cfg).to_dict() for name, cfg in design_configs(base, designs(64)).items()
    }
    overrides = [o for o in study["base_overrides"] if not o.startswith("--train.seed=")]
    names = sorted({name for point in study["points"] for name in point["design_overrides"]})
    return (study["compute"], overrides, study["tokens_per_step"], study["evals"], trained, names)


def _as_trained(cfg: RunConfig) -> RunConfig:
    """`cfg` with d_ff cleared where no layer reads it (every layer an MoE layer)."""
    model = cfg.model
    if len(model.moe_layer_indices) == model.n_layers:
        model = model.replace(d_ff=None)
    return cfg.replace(model=model)


def _read_study(path: Path) -> dict[str, Any]:
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SystemExit(f"cannot read {path} as a study's JSON: {err}") from None
    if not isinstance(study, dict) or study.get("benchmark") != "moe_scaling":
        raise SystemExit(f"{path} is not a moe_scaling.py result: give the JSON files it wrote")
    return study


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the study; print and write the JSON (and the PNG beside it); return it."""
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge)
        print(atomic_write_json(args.out, result))
        plot(result, args.out.with_suffix(".png"))
        return result
    keep_freed_memory()  # as the training commands do; lasts for the process
    base = apply_overrides(RunConfig.preset("experiment"), [*BASE, *args.set])
    t = base.train
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    started, machine = time.perf_counter(), machine_info()
    points = [
        run_point(base, args, size_for(base, b, args.compute, tokens_per_step))
        for b in args.budgets
    ]
    result = {
        "benchmark": "moe_scaling",
        "machine": machine,
        "compute": args.compute,
        "base_overrides": [*BASE, *args.set],
        "tokens_per_step": tokens_per_step,
        "evals": args.evals,
        "summary": summarise(points),
        "points": points,
        "base": base.to_dict(),
        "wall_seconds": time.perf_counter() - started,
    }
    machine["loadavg_end"] = list(os.getloadavg())
    print(atomic_write_json(args.out, result))
    plot(result, args.out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
