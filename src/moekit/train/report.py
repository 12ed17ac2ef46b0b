"""The end-of-run report: report.md with the config, parameter counts, final losses and
throughput, and two PNG plots (loss curves; each MoE layer's expert load over training)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display

from moekit.config import RunConfig
from moekit.fileio import atomic_write_text, save_figure
from moekit.model import MoETransformer, format_count, parameter_table
from moekit.train.metrics import read_metrics


def write_report(
    run_dir: Path, cfg: RunConfig, model: MoETransformer, sample: str | None = None
) -> Path:
    """Write RUN_DIR/report.md (and loss.png, expert_load.png) from RUN_DIR/metrics.jsonl."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    plots = []
    if train:
        curves = {"train": [(r["step"], r["lm_loss"]) for r in train]}
        curves["validation"] = [(r["step"], r["val_loss"]) for r in evals]
        ylabel, title = "cross-entropy (nats/token)", "Language-model loss"
        figure = curves_figure(curves, "optimizer step", ylabel, title, loss=False)
        save_figure(figure, run_dir / "loss.png")
        plots.append(("Loss", "loss.png"))
    if train and train[-1]["layers"]:
        save_figure(expert_load_figure(train), run_dir / "expert_load.png")
        plots.append(("Expert load (share of the mean; 1 = balanced)", "expert_load.png"))
    text = report_text(run_dir, cfg, model, train, evals, plots, sample)
    atomic_write_text(run_dir / "report.md", text)
    return run_dir / "report.md"


def summary(train: list[dict[str, Any]], evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The key figures of a run from its metrics records."""
    seconds = sum(r["seconds"] for r in train)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in train)
    last_train = train[-1] if train else {}
    last_eval = evals[-1] if evals else {}
    return {
        "step": last_train.get("step", 0),
        "tokens": last_train.get("tokens", 0),
        "train_loss": last_train.get("lm_loss"),
        "val_loss": last_eval.get("val_loss"),
        "val_bpb": last_eval.get("val_bpb"),
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "train_seconds": seconds,
        "max_vio": max((layer["max_vio"] for layer in last_train.get("layers", [])), default=None),
        # depth k's loss predicts the token k + 1 ahead (multi-token prediction), k = 1, 2, ...
        "mtp_losses": [v for n, v in last_train.items() if n.startswith("mtp_loss_")],
    }


def report_text(
    run_dir: Path,
    cfg: RunConfig,
    model: MoETransformer,
    train: list[dict[str, Any]],
    evals: list[dict[str, Any]],
    plots: list[tuple[str, str]],
    sample: str | None,
) -> str:
    s = summary(train, evals)
    lines = [
        f"# Training report: {run_dir.name}",
        "",
        f"- parameters: {format_count(model.num_parameters())} total, "
        f"{format_count(model.num_parameters(active=True))} active per token",
        f"- steps: {s['step']} of {cfg.train.steps}, {s['tokens']:,} tokens",
        f"- final train loss: {loss_text(s['train_loss'])} nats/token (mean of the last log "
        "interval)",
        f"- final validation loss: {loss_text(s['val_loss'])} nats/token, "
        f"{loss_text(s['val_bpb'])} bits per byte",
        f"- throughput: {s['tokens_per_s']:,.0f} tokens/s over {s['train_seconds']:.0f} s of "
        "training steps",
    ]
    if s["mtp_losses"]:
        depths = ", ".join(f"depth {k}: {v:.4f}" for k, v in enumerate(s["mtp_losses"], 1))
        lines.append(f"- final multi-token-prediction loss ({depths}) nats/token")
    if s["max_vio"] is not None:
        lines.append(f"- worst layer MaxVio over the last log interval: {s['max_vio']:.3f}")
    for title, name in plots:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    if sample is not None:
        lines += ["", "## Sample", "", "```python", sample, "```"]
    lines += ["", "## Parameters", "", "```", parameter_table(model), "```"]
    lines += ["", "## Config", "", "```json", cfg.to_json(), "```", ""]
    return "\n".join(lines)


def loss_text(value: float | None) -> str:
    """A loss to 4 decimals, or "n/a"."""
    return "n/a" if value is None else f"{value:.4f}"


VAL_LOSS = "validation cross-entropy (nats/token)"


def curves_figure(
    curves: Mapping[str, Sequence[Sequence[float]]], xlabel: str, ylabel: str, title: str = "",
    baseline: str | None = None, labels: Mapping[str, str] | None = None, loss: bool = True,
) -> Figure:  # fmt: skip
    """One line per curve of (x, y) points (NaN left out), labelled by `labels` or its name; the
    `baseline`'s black, with its last value a dashed line. For a `loss`, the y range starts
    below the lowest value and stops at 1.5 x the median: the first steps' losses would flatten
    the differences between the curves."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for name, curve in curves.items():
        points = [(x, y) for x, y in curve if y == y]
        if points:
            black = {"color": "black", "lw": 2} if name == baseline else {"lw": 1}
            style = "o-" if len(points) <= 40 else "-"
            label = (labels or {}).get(name, name)
            ax.plot(*zip(*points, strict=True), style, ms=3, label=label, **black)
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if loss and values:
        low, mid = min(values), float(np.median(values))
        ax.set_ylim(low - 0.05 * (mid - low), 1.5 * mid)
    if baseline is not None:
        ax.axhline(curves[baseline][-1][1], color="gray", ls="--", lw=1)
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def expert_load_figure(train: list[dict[str, Any]]) -> Figure:
    """One heatmap per MoE layer: expert (rows) by step (columns), coloured by the expert's share
    of the tokens routed in that log interval relative to the mean (1 = perfectly balanced)."""
    n_layers = len(train[-1]["layers"])
    steps = [r["step"] for r in train]
    fig = Figure(figsize=(9, 1.2 + 1.6 * n_layers))
    axes = np.atleast_1d(fig.subplots(n_layers, 1, sharex=True))
    image = None
    for i, ax in enumerate(axes):
        counts = np.array([r["layers"][i]["counts"] for r in train], dtype=float).T
        load = counts / np.maximum(counts.mean(axis=0, keepdims=True), 1e-9)
        extent = (0, steps[-1], counts.shape[0] - 0.5, -0.5)
        image = ax.imshow(
            load, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, extent=extent,
            interpolation="nearest",
        )  # fmt: skip
        ax.set_ylabel(f"layer {i}\nexpert")
        ax.set_yticks(range(0, counts.shape[0], max(1, counts.shape[0] // 16)))
        ax.tick_params(axis="y", labelsize=7)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle("Expert load per MoE layer (tokens routed / mean; 1 = balanced)")
    fig.colorbar(image, ax=list(axes), label="load / mean", shrink=0.9)
    return fig
