"""Parameter counts of a model or config: total, active per token, and where they are."""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.experts import Experts, SharedExperts
from moekit.model.attention import Attention
from moekit.model.block import DenseFFN
from moekit.model.mla import LatentAttention
from moekit.model.transformer import MoETransformer
from moekit.routing import Router

# The parts that partition the parameters: their counts sum to the total.
PARTS = (
    "embeddings",
    "attention",
    "dense_ffn",
    "routed_experts",
    "shared_experts",
    "router",
    "norms",
)
_PART_OF_MODULE: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.RMSNorm, "norms"),
    (nn.Embedding, "embeddings"),
    (Router, "router"),
    (Experts, "routed_experts"),
    (SharedExperts, "shared_experts"),
    (DenseFFN, "dense_ffn"),
    (Attention, "attention"),
    (LatentAttention, "attention"),
)


def parameter_breakdown(model: ModelConfig | MoETransformer) -> dict[str, int]:
    """Parameter counts of the main model by part (the keys of `PARTS`, which sum to "total"),
    plus "routed_experts_active" (top_k experts per MoE layer), "total" and "active" (per token);
    and "mtp", "mtp_active": the multi-token-prediction module apart (0 without one; it shares
    the main model's embedding and head, counted there). DeepSeek-V3's published 671B is the main
    model's.

    A config is built on the meta device, so the largest models cost no memory.
    """
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = MoETransformer(model)
    counts = dict.fromkeys(PARTS, 0)
    for name, p in model.named_parameters():
        if not name.startswith("mtp."):
            counts[part_of(model, name)] += p.numel()
    counts["total"] = sum(counts[part] for part in PARTS)
    inactive = counts["total"] - model.num_parameters(active=True, mtp=False)
    counts["routed_experts_active"] = counts["routed_experts"] - inactive
    counts["active"] = counts["total"] - inactive
    counts["mtp"] = model.num_parameters() - counts["total"]
    counts["mtp_active"] = model.num_parameters(active=True) - counts["active"]
    return counts


def part_of(model: MoETransformer, param_name: str) -> str:
    """The part of the innermost module holding the parameter that has one (the LM head is an
    embedding)."""
    path = param_name.split(".")[:-1]
    if path == ["lm_head"]:
        return "embeddings"
    for depth in range(len(path), 0, -1):
        module = model.get_submodule(".".join(path[:depth]))
        for kind, part in _PART_OF_MODULE:
            if isinstance(module, kind):
                return part
    raise ValueError(f"parameter {param_name!r} belongs to no known part of the model")


def format_count(n: int) -> str:
    """A parameter count to 3 significant figures with a K/M/B/T suffix: 46702792704 -> "46.7B"."""
    rounded = float(f"{n:.3g}")
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if rounded >= scale:
            value = rounded / scale
            decimals = max(0, 2 - math.floor(math.log10(value * (1 + 1e-9))))  # 1000T: 0
            return f"{value:.{decimals}f}{suffix}"
    return str(n)


def parameter_table(model: ModelConfig | MoETransformer, title: str | None = None) -> str:
    """A plain-text table of `parameter_breakdown`: each part's total and active counts, the main
    model's total; with multi-token prediction, the MTP module's and the sum of both."""
    counts = parameter_breakdown(model)
    active = {**counts, "routed_experts": counts["routed_experts_active"]}
    rows = [(part.replace("_", " "), counts[part], active[part]) for part in PARTS]
    rows.append(("total", counts["total"], counts["active"]))
    if counts["mtp"]:
        rows.append(("mtp module", counts["mtp"], counts["mtp_active"]))
        both = ("total with mtp", counts["total"] + counts["mtp"])
        rows.append((*both, counts["active"] + counts["mtp_active"]))
    width = max(18, 2 + max(len(f"{n:,}") for row in rows for n in row[1:]))  # column apart
    lines = [] if title is None else [title]
    lines.append(f"{'part':<16}{'total':>{width}}{'active':>{width + 8}}")
    for label, total, active in rows:
        if label == "total":
            lines.append("-" * (32 + 2 * width))
        counts = f"{total:>{width},}{format_count(total):>8}{active:>{width},}"
        lines.append(f"{label:<16}{counts}{format_count(active):>8}")
    return "\n".join(lines)
