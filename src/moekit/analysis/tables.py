"""Plain-text tables of expert load, for terminals and reports."""

from __future__ import annotations

from torch import Tensor


def load_table(routed_E: Tensor, processed_E: Tensor | None = None, width: int = 40) -> str:
    """One row per expert: routed assignments, processed ones, share of the mean, and a bar."""
    routed = routed_E.float()
    mean = max(routed.mean().item(), 1e-9)
    top = max(routed.max().item(), 1e-9)
    processed = routed_E if processed_E is None else processed_E
    lines = [f"{'expert':>6} {'routed':>8} {'computed':>8} {'x mean':>7}  load"]
    for e, (r, p) in enumerate(zip(routed.tolist(), processed.tolist(), strict=True)):
        bar = "#" * round(width * r / top)
        lines.append(f"{e:>6} {int(r):>8} {int(p):>8} {r / mean:>7.2f}  {bar}")
    return "\n".join(lines)
