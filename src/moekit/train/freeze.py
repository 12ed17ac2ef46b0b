"""Fine-tuning with parts of the model frozen: `train.freeze` lists the parts whose parameters
get no gradient and are left out of the optimizer. The parts are the kinds of module (`PARTS`,
wherever they are) and the two modules of a model with multi-token prediction (`MODULES`): the
main model, and the MTP module (`mtp.*`; `--train.freeze=model` trains it alone, on a frozen
model, which is how a model that lacks one gains one)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from moekit.config import FREEZE_PARTS
from moekit.train.sample import read_run_config

# Each part: the module names (a component of a parameter's dotted name) it covers.
PARTS = {
    "experts": ("experts", "shared_experts"),  # routed and shared experts of the MoE layers
    "router": ("router",),
    "attention": ("attn",),  # the attention projections (the norms stay trainable)
}

MODULES = ("model", "mtp")


def module_of(name: str) -> str:
    """ "mtp" for a parameter of the multi-token-prediction module, else "model"."""
    return "mtp" if name.startswith("mtp.") else "model"


def part_of(name: str) -> str:
    """The part a parameter belongs to ("other" for embeddings, norms, dense FFNs, the head)."""
    components = set(name.split("."))
    for part, modules in PARTS.items():
        if components & set(modules):
            return part
    return "other"


def freeze(model: nn.Module, parts: Sequence[str]) -> None:
    """Set requires_grad=False on every parameter of `parts` (as `train.freeze` lists them)."""
    unknown = set(parts) - set(FREEZE_PARTS)
    if unknown:
        raise ValueError(
            f"cannot freeze {sorted(unknown)}: the parts are {', '.join(FREEZE_PARTS)}"
        )
    for name, param in model.named_parameters():
        if part_of(name) in parts or module_of(name) in parts:
            param.requires_grad_(False)


def trainable_table(model: nn.Module) -> str:
    """Parameters per part: trainable and frozen, and the trainable share of the whole."""
    counts: dict[str, list[int]] = {part: [0, 0] for part in [*PARTS, "other"]}
    mtp = [0, 0]  # the mtp module's, across the parts
    for name, param in model.named_parameters():
        slot = 0 if param.requires_grad else 1
        counts[part_of(name)][slot] += param.numel()
        if module_of(name) == "mtp":
            mtp[slot] += param.numel()
    total = sum(t + f for t, f in counts.values())
    trainable = sum(t for t, _ in counts.values())
    lines = [f"{'part':<10} {'trainable':>12} {'frozen':>12}"]
    lines += [f"{p:<10} {t:>12,} {f:>12,}" for p, (t, f) in counts.items() if t + f]
    if sum(mtp):
        lines.append(f"of which the mtp module: {mtp[0]:,} trainable, {mtp[1]:,} frozen")
    lines.append(f"trainable: {trainable:,} of {total:,} ({trainable / max(total, 1):.1%})")
    return "\n".join(lines)


assert (*PARTS, *MODULES) == FREEZE_PARTS  # the config validates the same names


def optimizer_state_to_restore(
    run_dir: Path, parts: Sequence[str], optimizer_sd: dict[str, Any], step: int
) -> dict[str, Any] | None:
    """A resumed checkpoint's optimizer state, or None where it holds none (no optimizer step yet:
    a converted or upcycled run's step 0), which leaves `train.freeze` free to change. Once the
    run has trained, its state is for the parameters it trained: ValueError, saying what to do,
    if `parts` are not the frozen parts its config.json records."""
    if not optimizer_sd["state"]:
        return None
    recorded = (
        read_run_config(run_dir).train.freeze if (run_dir / "config.json").is_file() else parts
    )
    if set(recorded) != set(parts):
        raise ValueError(
            f"train.freeze={list(parts)} freezes other parts than {run_dir} trained with to step "
            f"{step} ({list(recorded)}), whose optimizer state is for the parameters it trained: "
            f"resume with train.freeze={list(recorded)}, or start a new run from its weights: "
            f"moekit train {run_dir / 'config.json'} --train.init_from={run_dir} "
            f"--train.freeze={','.join(parts) or '[]'} --out NEW_RUN"
        )
    return optimizer_sd
