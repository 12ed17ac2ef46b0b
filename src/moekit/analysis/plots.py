"""Figures of a routing analysis: one panel per MoE layer. Each takes the numbers of
`analysis.report.layer_stats` (plain lists) and returns a matplotlib Figure."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no display


def _panels(n: int, width: float = 4.0, height: float = 3.2) -> tuple[Figure, list[Any]]:
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def load_figure(layers: list[dict[str, Any]]) -> Figure:
    """Bars: each expert's share of the assignments, with the uniform share and the dead line."""
    fig, axes = _panels(len(layers))
    for i, (ax, layer) in enumerate(zip(axes, layers, strict=True)):
        load = np.asarray(layer["load"])
        colors = ["tab:red" if e in layer["dead_experts"] else "tab:blue" for e in range(len(load))]
        ax.bar(range(len(load)), load, color=colors)
        ax.axhline(1 / len(load), color="black", lw=1, ls="--", label="uniform")
        ax.axhline(0.1 / len(load), color="tab:red", lw=1, ls=":", label="dead (<10% of mean)")
        ax.set_title(f"layer {i}: MaxVio {layer['max_vio']:.2f}")
        ax.set_xlabel("expert")
        ax.set_ylabel("share of assignments")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def repetition_figure(layers: list[dict[str, Any]]) -> Figure:
    """Measured consecutive-token repetition beside the random baselines, per layer."""
    fig, (ax,) = _panels(1, width=max(5.0, 1.6 * len(layers)), height=3.5)
    x = np.arange(len(layers))
    bars = [
        ("first choice", [r["repetition"]["first"] for r in layers]),
        ("first: random (load-weighted)", [r["baselines"]["first_load_weighted"] for r in layers]),
        ("any of top-k", [r["repetition"]["any"] for r in layers]),
        ("any: random (uniform)", [r["baselines"]["any_uniform"] for r in layers]),
    ]
    for j, (label, values) in enumerate(bars):
        ax.bar(x + (j - 1.5) * 0.2, values, 0.2, label=label, hatch="//" if j % 2 else None)
    ax.set_xticks(x, [f"layer {i}" for i in x])
    ax.set_ylabel("share of consecutive token pairs")
    ax.set_title("consecutive-token repetition (Mixtral Table 5)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_figure(
    mats: list[list[list[float]]], title: str, xlabel: str, ylabel: str,
    xticks: list[str] | None = None, baseline: float | None = None,
) -> Figure:  # fmt: skip
    """One heatmap per layer. With `baseline`, colours are the ratio to it (1 = no preference)."""
    fig, axes = _panels(len(mats), width=max(4.0, 0.45 * len(xticks or [])), height=3.6)
    for i, (ax, mat) in enumerate(zip(axes, mats, strict=True)):
        m = np.asarray(mat, dtype=float)
        if baseline:
            im = ax.imshow(m / baseline, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto")
        else:
            im = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(f"layer {i}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xticks:
            ax.set_xticks(range(len(xticks)), xticks, rotation=60, ha="right", fontsize=7)
        fig.colorbar(im, ax=ax, label=f"share / {baseline:.3f} (uniform)" if baseline else "share")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def saturation_figure(steps: list[int], layers: list[list[float]]) -> Figure:
    """Top-k overlap of each checkpoint with the final one, per layer."""
    fig, (ax,) = _panels(1, width=5.5, height=3.5)
    for i, values in enumerate(layers):
        ax.plot(steps, values, marker="o", label=f"layer {i}")
    ax.set_xlabel("checkpoint step")
    ax.set_ylabel("top-k overlap with final")
    ax.set_ylim(0, 1.02)
    ax.set_title("router saturation (OLMoE)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
