"""An MoE run and its dense twin (`dense_twin`: the same compute per token) trained side by side on
the same batches, compared by steps and by time to the dense model's final loss, with one report
for both: what `moekit demo` shows.

    out/moe/, out/dense/   two ordinary run directories (`moekit generate out/moe` samples)
    out/report.md          the comparison, with loss.png (both models) and expert_load.png (the MoE)
    out/comparison.json    its figures: each run's summary and the MoE's ratios to dense
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from moekit.config import RunConfig, dense_twin
from moekit.fileio import atomic_write_json, atomic_write_text, save_figure
from moekit.machine import machine_info
from moekit.model import format_count
from moekit.train.lockstep import (
    compare_to,
    parallel_threads,
    run_in_parallel,
    run_summary,
    train_in_lockstep,
)
from moekit.train.metrics import read_metrics
from moekit.train.report import VAL_LOSS, curves_figure, expert_load_figure

MOE, DENSE = "moe", "dense"


@dataclass
class TwinResult:
    """runs: each run's `run_summary`; comparison: `compare_to` against the dense run."""

    out: Path
    steps: int
    runs: dict[str, dict[str, Any]]
    comparison: dict[str, dict[str, Any]]
    setting: dict[str, Any]  # how the two shared the machine, and the machine at the start

    @property
    def moe_dir(self) -> Path:
        return self.out / MOE

    @functools.cached_property
    def balance(self) -> list[dict[str, float]]:
        """The MoE's `balance_rows`."""
        return balance_rows(self.moe_dir)


def train_with_dense_twin(
    cfg: RunConfig, out: Path, progress: bool = True, parallel: bool = True
) -> TwinResult:
    """Train `cfg` (an MoE model) and its dense twin into out/moe and out/dense: at the same
    time in two processes (`run_in_parallel`), or with `parallel=False` in lockstep."""
    configs = {MOE: cfg, DENSE: cfg.replace(model=dense_twin(cfg.model))}
    setting = {
        "side_by_side": "two processes at once" if parallel else "lockstep in one process",
        "threads_per_run": cfg.train.threads or (parallel_threads(2) if parallel else None),
        "machine": machine_info(),
    }
    dirs = {name: out / name for name in configs}
    (run_in_parallel if parallel else train_in_lockstep)(configs, dirs, progress)
    runs = {name: run_summary(dirs[name], configs[name]) for name in configs}
    steps = cfg.train.steps
    return TwinResult(out, steps, runs, compare_to(runs, DENSE, steps), setting)


def balance_rows(run_dir: Path, tail: float = 0.25) -> list[dict[str, float]]:
    """Per MoE layer, over the last `tail` of the logged training: the least and most loaded
    expert's share of the mean load (1 = balanced) and MaxVio (most loaded / mean - 1)."""
    train = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    last = train[int(len(train) * (1 - tail)) :] or train[-1:]
    counts = np.array([[layer["counts"] for layer in r["layers"]] for r in last]).sum(axis=0)
    share = counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-9)  # (layers, experts)
    return [
        {
            "layer": i,
            "experts": len(row),
            "min": float(row.min()),
            "max": float(row.max()),
            "max_vio": float(row.max() - 1),
        }
        for i, row in enumerate(share)
    ]


def balance_table(rows: list[dict[str, float]]) -> str:
    lines = [f"{'MoE layer':>9} {'experts':>7} {'least loaded':>12} {'most loaded':>11}  (x mean)"]
    lines += [
        f"{r['layer']:>9} {r['experts']:>7} {r['min']:>12.2f} {r['max']:>11.2f}" for r in rows
    ]
    return "\n".join(lines)


def ratio_text(result: TwinResult, key: str) -> str:
    """ "0.60x", or "never" when the MoE did not reach dense's final loss."""
    value = result.comparison[MOE][key]
    return "never" if value is None else f"{value:.2f}x"


def write_twin_report(result: TwinResult, cfg: RunConfig, sample: str | None) -> Path:
    """out/report.md, out/loss.png, out/expert_load.png and out/comparison.json."""
    out = result.out
    figures = {"steps": result.steps, "comparison": result.comparison, "runs": result.runs,
               "balance": result.balance, "config": cfg.to_dict(),
               **result.setting}  # fmt: skip
    atomic_write_json(out / "comparison.json", figures)
    save_figure(twin_loss_figure(result), out / "loss.png")
    moe_train = [r for r in read_metrics(result.moe_dir / "metrics.jsonl") if r["kind"] == "train"]
    save_figure(expert_load_figure(moe_train), out / "expert_load.png")
    moe, dense = result.runs[MOE], result.runs[DENSE]
    cmp = result.comparison[MOE]
    lines = [
        "# An MoE and its dense twin, trained side by side",
        "",
        f"Both see the same {result.steps} batches in the same order; the dense twin's FFN has the"
        f" MoE's active width ({cfg.model.moe.active_width}), so both compute about the same per"
        " token.",
        "",
        "| | MoE | dense |",
        "|---|---|---|",
        f"| parameters | {format_count(moe['parameters'])} | {format_count(dense['parameters'])} |",
        f"| active per token | {format_count(moe['active_parameters'])} | "
        f"{format_count(dense['active_parameters'])} |",
        f"| final validation loss (nats/token) | {moe['final_val_loss']:.4f} | "
        f"{dense['final_val_loss']:.4f} |",
        f"| bits per byte | {moe['final_val_bpb']:.4f} | {dense['final_val_bpb']:.4f} |",
        f"| tokens/s | {moe['tokens_per_s']:,.0f} | {dense['tokens_per_s']:,.0f} |",
        f"| training seconds | {moe['train_seconds']:.0f} | {dense['train_seconds']:.0f} |",
        "",
        f"- steps to dense's final validation loss, over dense's steps: "
        f"{ratio_text(result, 'step_ratio')}",
        f"- training time to it, over dense's training time: {ratio_text(result, 'time_ratio')}",
        f"- throughput: {cmp['throughput_ratio']:.2f}x dense's",
        "",
        "![validation loss](loss.png)",
        "",
        "## Expert balance (last quarter of training)",
        "",
        "```",
        balance_table(result.balance),
        "```",
        "",
        "![expert load](expert_load.png)",
    ]
    if sample is not None:
        lines += ["", "## Sample (from the MoE)", "", "```python", sample, "```"]
    lines += ["", f"Each model's own report: `{MOE}/report.md`, `{DENSE}/report.md`.", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"


def twin_loss_figure(result: TwinResult) -> Figure:
    """Validation loss of both models against the step, with dense's final loss marked."""
    title = "MoE never reaches dense's final loss"
    if result.comparison[MOE]["step_ratio"] is not None:
        title = (
            f"MoE reaches dense's final loss at {ratio_text(result, 'step_ratio')} the steps, "
            f"{ratio_text(result, 'time_ratio')} the time"
        )
    curves = {name: run["val_curve"] for name, run in result.runs.items()}
    labels = {name: f"{name} ({format_count(run['parameters'])} parameters, "
              f"{format_count(run['active_parameters'])} active)"
              for name, run in result.runs.items()}  # fmt: skip
    return curves_figure(curves, "optimizer step", VAL_LOSS, title, DENSE, labels)
