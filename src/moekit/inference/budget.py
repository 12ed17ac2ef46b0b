"""Expert budgets: how many experts an expert cache holds, given as a count, a fraction of all
experts or a size in bytes."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 2**10, "MI": 2**20, "GI": 2**30}


def resolve_budget(
    budget: int | float | str, n_total: int, expert_bytes: int | None, top_k: int
) -> int:
    """A budget as a number of experts: an int is a count, a float in (0, 1] or "N%" a fraction of
    all experts, "N[K|M|G]B" (or "NKiB" ...) bytes (refused where `expert_bytes` is None: a
    routing trace knows no sizes). Below top_k experts nothing can run."""
    count = _parse_budget(budget, n_total, expert_bytes)
    if count < top_k:
        size = "" if expert_bytes is None else f"{top_k * expert_bytes:,} bytes, "
        raise ValueError(
            f"expert budget {budget!r} holds {count} experts; the minimum is top_k={top_k} "
            f"({size}{top_k / n_total:.1%} of the {n_total} experts)"
        )
    return min(count, n_total)


def check_budget_form(budget: str, in_bytes: bool = True) -> str:
    """`budget` if `resolve_budget` can read it (before the model's sizes are known); raises
    ValueError saying what forms it takes otherwise. For command-line arguments."""
    _parse_budget(budget, 1, 1 if in_bytes else None)
    return budget


def _parse_budget(budget: int | float | str, n_total: int, expert_bytes: int | None) -> int:
    given = budget
    forms = "a count (12) or a fraction (0.5 or 50%)"
    if expert_bytes is not None:
        forms = "a count (12), a fraction (0.5 or 50%) or bytes (200MB)"
    if isinstance(budget, str):
        text = budget.strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMG]I?)?B", text, re.IGNORECASE)
        if m and expert_bytes is None:
            raise ValueError(
                f"expert budget {budget!r} is in bytes, but a routing trace does not know the "
                "experts' size: give a count (12) or a fraction (0.5 or 50%)"
            )
        if m:
            return int(float(m[1]) * _UNITS[(m[2] or "").upper()]) // expert_bytes
        try:
            if text.endswith("%"):
                budget = float(text[:-1]) / 100
            else:
                budget = int(text) if text.isdigit() else float(text)
        except ValueError:
            raise ValueError(f"expert budget {given!r} is invalid: give {forms}") from None
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ValueError(f"expert budget {budget!r} is invalid: must be an int, float or str")
    if budget < 0 or budget != budget:  # negative, or NaN
        raise ValueError(f"expert budget {given!r} is invalid: give {forms}")
    if isinstance(budget, float):
        if not 0 < budget <= 1:
            raise ValueError(f"expert budget {given!r} is invalid: a fraction must be in (0, 1]")
        return int(budget * n_total)
    return budget
