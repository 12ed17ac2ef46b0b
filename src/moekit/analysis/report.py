"""The routing report: statistics per MoE layer from a trace, written as JSON, PNGs and Markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moekit.analysis import metrics, plots
from moekit.analysis.token_classes import CLASSES
from moekit.analysis.trace import RoutingTrace
from moekit.fileio import atomic_write_text, make_dirs, save_figure
from moekit.losses import entropy, max_violation

MAX_DOMAINS = 12  # the most frequent packages get a column each; the rest share "(other)"
VOCAB_MIN_COUNT = 5  # token ids seen fewer times are left out of vocabulary specialisation


def layer_stats(trace: RoutingTrace, layer: int, n_experts: int, top_k: int) -> dict[str, Any]:
    """Every statistic of one MoE layer, as plain numbers and lists (JSON-ready)."""
    ids = trace.ids[layer]
    load = metrics.expert_load(ids, n_experts)
    first_load = metrics.expert_load(ids[:, :1], n_experts)
    domain, names = top_domains(trace.tokens.domain, trace.tokens.domains)
    tokens = torch.from_numpy(trace.tokens.token_ids)
    vocab = metrics.vocabulary_specialisation(tokens, ids, n_experts, VOCAB_MIN_COUNT)
    return {
        "load": load.tolist(),
        "max_vio": float(max_violation(load)),
        "load_entropy": float(entropy(load)),
        "routing_entropy": trace.entropy[layer],
        "dead_experts": metrics.dead_experts(load),
        "repetition": metrics.repetition(ids, trace.new_seq),
        "baselines": metrics.repetition_baselines(n_experts, top_k, first_load),
        "coactivation": metrics.coactivation(ids, n_experts).tolist(),
        "token_class": metrics.specialisation(
            ids, torch.from_numpy(trace.tokens.token_class), len(CLASSES), n_experts
        ).tolist(),
        "domain": metrics.specialisation(ids, domain, len(names), n_experts).tolist(),
        "domains": names,
        "vocabulary_per_expert": vocab["per_expert"].tolist(),
        "top_tokens": _top_tokens(vocab),
    }


def top_domains(domain_T: np.ndarray, names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Domain labels with the MAX_DOMAINS most frequent kept and the rest merged into "(other)"."""
    counts = np.bincount(domain_T, minlength=len(names))
    keep = [int(d) for d in np.argsort(-counts, kind="stable")[:MAX_DOMAINS] if counts[d]]
    remap = np.full(len(names), len(keep))
    remap[keep] = np.arange(len(keep))
    kept = [names[d] for d in keep] + (["(other)"] if len(keep) < np.count_nonzero(counts) else [])
    return torch.from_numpy(remap[domain_T]), kept


def _top_tokens(vocab: dict[str, torch.Tensor], n: int = 5) -> list[list[int]]:
    """Per expert, the token ids most exclusively routed to it."""
    share = vocab["share"]
    if share.shape[0] == 0:
        return [[] for _ in range(share.shape[1])]
    order = torch.argsort(share, dim=0, descending=True)[:n]
    return [vocab["token_ids"][order[:, e]].tolist() for e in range(share.shape[1])]


def write_report(
    out_dir: Path, layers: list[dict[str, Any]], meta: dict[str, Any],
    saturation: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """analysis.json, the PNGs and report.md in `out_dir`; returns the report's path."""
    make_dirs(out_dir)
    data = {"meta": meta, "layers": layers, "saturation": saturation}
    atomic_write_text(out_dir / "analysis.json", json.dumps(data, indent=1))
    k_over_e = meta["top_k"] / meta["n_experts"]
    figures = {
        "load.png": plots.load_figure(layers),
        "repetition.png": plots.repetition_figure(layers),
        "coactivation.png": plots.heatmap_figure(
            [r["coactivation"] for r in layers], "co-activation: share of row's tokens also on "
            "column (OLMoE)", "expert j", "expert i"),
        "token_class.png": plots.heatmap_figure(
            [r["token_class"] for r in layers], "token class specialisation", "class", "expert",
            list(CLASSES), k_over_e),
        "domain.png": plots.heatmap_figure(
            [r["domain"] for r in layers], "domain specialisation", "package", "expert",
            layers[0]["domains"], k_over_e),
    }  # fmt: skip
    if saturation:
        figures["saturation.png"] = plots.saturation_figure(
            saturation["steps"], saturation["layers"]
        )
    for name, fig in figures.items():
        save_figure(fig, out_dir / name, dpi=90)
    path = out_dir / "report.md"
    atomic_write_text(path, report_text(layers, meta, saturation, list(figures)))
    return path


def report_text(
    layers: list[dict[str, Any]], meta: dict[str, Any], saturation: dict[str, Any] | None,
    figures: Sequence[str],
) -> str:  # fmt: skip
    """The Markdown report: a table per layer, the baselines' definitions, and the figures."""
    e, k = meta["n_experts"], meta["top_k"]
    lines = [
        f"# Routing analysis: {meta['source']}",
        "",
        f"{meta['n_tokens']} tokens of {meta['data']}, {len(layers)} MoE layers, "
        f"{e} experts, top-{k}. Numbers behind every figure: `analysis.json`.",
        "",
        "| layer | MaxVio | load entropy / log E | routing entropy (nats) | dead experts "
        "| repeat 1st | random 1st (1/E; load-weighted) | repeat any | random any "
        "| vocab. specialisation (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(layers):
        b, rep = r["baselines"], r["repetition"]
        lines.append(
            f"| {i} | {r['max_vio']:.3f} | {r['load_entropy'] / math.log(e):.3f} "
            f"| {r['routing_entropy']:.3f} | {r['dead_experts'] or '-'} | {rep['first']:.3f} "
            f"| {b['first_uniform']:.3f}; {b['first_load_weighted']:.3f} | {rep['any']:.3f} "
            f"| {b['any_uniform']:.3f} | {np.mean(r['vocabulary_per_expert']):.3f} |"
        )
    lines += ["", *DEFINITIONS.format(k_over_e=k / e).splitlines(), ""]
    lines += ["Most preferred expert per token class (share / uniform K/E), per layer:", ""]
    for i, r in enumerate(layers):
        lines.append(f"- layer {i}: " + favourites(r["token_class"], list(CLASSES), k / e))
    lines.append("")
    if saturation:
        final = [f"{v[0]:.3f}" for v in saturation["layers"]]
        lines += [f"Router saturation at the first checkpoint (step {saturation['steps'][0]}), "
                  f"per layer: {', '.join(final)}.", ""]  # fmt: skip
    lines += [f"![{name[:-4]}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def favourites(spec_EC: list[list[float]], classes: list[str], uniform: float) -> str:
    """ "keyword: expert 3 (2.1x), ...": each class's most preferred expert and its ratio."""
    spec = np.asarray(spec_EC)
    parts = []
    for c, name in enumerate(classes):
        if spec[:, c].any():
            e = int(spec[:, c].argmax())
            parts.append(f"{name}: expert {e} ({spec[e, c] / uniform:.1f}x)")
    return ", ".join(parts)


DEFINITIONS = """\
Definitions. Dead: load below 10% of the mean load. Repeat 1st: share of consecutive token pairs
(within a sequence) whose first-choice expert is the same; random 1st: 1/E for uniform routing
(the Mixtral paper's baseline) and sum_i p_i^2 for independent tokens at the measured first-choice
load p. Repeat any: share of pairs whose top-k sets share an expert; random any: 1 - C(E-K, K) /
C(E, K) for uniform random top-k sets. Co-activation (i, j): share of tokens routed to i also routed
to j (OLMoE). Specialisation (expert, class): share of the class's tokens routed to the expert;
uniform routing gives K/E = {k_over_e:.3f}, and the heatmaps show the ratio to it. Vocabulary
specialisation of an expert: mean, over its routings, of the share of that token id's occurrences
routed to it (K/E when uniform, 1 when exclusive); token ids seen at least 5 times."""
