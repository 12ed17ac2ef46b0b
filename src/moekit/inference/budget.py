"""Expert budgets: how many experts an expert cache holds, given as a count, a fraction of all
experts or a size in bytes."""

from __future__ import annotations

from moekit.interop.files import parse_size


def resolve_budget(
    budget: int | float | str,
    n_total: int,
    expert_bytes: int | None,
    top_k: int,
    *,
    name: str = "the budget",
    stored_as: str | None = None,
) -> int:
    """A budget as a number of experts: an int is a count, a float in (0, 1] or "N%" a fraction of
    all experts, "N[K|M|G]B" (or "NKiB" ...) bytes of `expert_bytes` each (one expert as stored:
    a quantized run's in its quantized format, `stored_as`; refused where `expert_bytes` is None:
    a routing trace knows no sizes). Below top_k experts nothing can run: ValueError naming the
    setting (`name`, e.g. "offload.budget"), the minimum and its size in bytes."""
    count = budget_count(budget, n_total, expert_bytes)
    if count < top_k:
        share = f"{top_k / n_total:.1%} of the {n_total} experts"
        least = f"{top_k} experts"
        if expert_bytes is not None:
            fmt = f" ({stored_as})" if stored_as else ""
            share += f"; {top_k} x {expert_bytes:,} bytes{fmt} = {top_k * expert_bytes:,} bytes"
            least += f" or {top_k * expert_bytes}B"
        raise ValueError(
            f"expert budget {budget!r} holds {count} experts; the minimum is top_k={top_k} "
            f"({share}): give {name} at least {least}"
        )
    return min(count, n_total)


def check_budget_form(budget: str, in_bytes: bool = True) -> str:
    """`budget` if `resolve_budget` can read it (before the model's sizes are known); raises
    ValueError saying what forms it takes otherwise. For command-line arguments."""
    budget_count(budget, 1, 1 if in_bytes else None)
    return budget


# What an expert budget may be, for errors: without the experts' size (a routing trace's), and with
COUNT_OR_FRACTION = "a count (12) or a fraction (0.5 or 50%)"
BUDGET_FORMS = "a count (12), a fraction (0.5 or 50%) or bytes (200MB)"


def budget_count(budget: int | float | str, n_total: int, expert_bytes: int | None) -> int:
    """The experts a budget names, before `resolve_budget` caps it at n_total (a count may name
    more than there are); ValueError naming the forms it takes where it names none."""
    given = budget
    forms = COUNT_OR_FRACTION if expert_bytes is None else BUDGET_FORMS
    if isinstance(budget, str):
        text = budget.strip()
        in_bytes = text.upper().endswith("B")
        if in_bytes and expert_bytes is None:
            raise ValueError(
                f"expert budget {budget!r} is in bytes, but a routing trace does not know the "
                f"experts' size: give {COUNT_OR_FRACTION}"
            )
        try:
            if in_bytes:
                return parse_size(text) // expert_bytes
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
            count = " (a count is a whole number: 12)" if budget > 1 else ""
            raise ValueError(
                f"expert budget {given!r} is invalid: a fraction must be in (0, 1]{count}; give "
                f"{forms}"
            )
        return int(budget * n_total)
    return budget
