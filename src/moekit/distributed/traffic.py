"""What crosses the network per training step under expert parallelism (`moekit params --ep N`).

Each token is routed to top_k experts; with E experts split evenly over ep processes and routing
balanced, a token's copy stays on its own process with probability 1/ep, so each process sends
top_k * (ep - 1) / ep copies of each of its tokens. Four all-to-alls move them per MoE layer and
training step, each of d_model values per copy: dispatch (forward), combine (forward), and their
gradients in the backward pass. Capacity dispatch sends fewer (dropped copies stay home): these
figures are its upper bound. The counts exchange and the balance statistics are a few numbers per
expert per call, not per token.
"""

from __future__ import annotations

import torch

from moekit.config import ModelConfig, MoEConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PARTS = ("dispatch_fwd", "combine_fwd", "dispatch_bwd", "combine_bwd")


def network_bytes(moe: MoEConfig, ep: int, dtype: torch.dtype) -> dict[str, float]:
    """Bytes each process sends to others per token per MoE layer per training step, by
    all-to-all (the PARTS, and "total"), rows in `dtype`, under balanced routing."""
    if ep < 1 or moe.n_experts % ep:
        raise ValueError(f"--ep {ep} must be >= 1 and divide n_experts ({moe.n_experts})")
    one_way = moe.top_k * (ep - 1) / ep * moe.d_model * dtype.itemsize
    figures = dict.fromkeys(PARTS, one_way)
    figures["total"] = sum(figures.values())
    return figures


def traffic_table(cfg: ModelConfig, ep: int) -> str:
    """A plain-text table of `network_bytes` for each dtype, per layer and for all MoE layers."""
    if cfg.moe is None:
        return "a dense model: expert parallelism sends nothing"
    n_layers = len(cfg.moe_layer_indices)
    lines = [
        f"expert parallelism over {ep} processes: bytes each process sends per token per MoE "
        "layer per training step",
        f"(balanced routing: {ep - 1}/{ep} of a token's top_k={cfg.moe.top_k} copies of "
        f"d_model={cfg.d_model} values leave its process;",
        " capacity dispatch sends at most this; the counts and balance statistics are per expert)",
        f"{'dtype':<10}{'dispatch fwd':>14}{'combine fwd':>13}{'dispatch bwd':>14}"
        f"{'combine bwd':>13}{'total':>11}{f'x {n_layers} layers':>16}",
    ]
    for name, dtype in DTYPES.items():
        b = network_bytes(cfg.moe, ep, dtype)
        cells = "".join(f"{b[p]:>{w},.0f}" for p, w in zip(PARTS, (14, 13, 14, 13), strict=True))
        lines.append(f"{name:<10}{cells}{b['total']:>11,.0f}{b['total'] * n_layers:>16,.0f}")
    return "\n".join(lines)
