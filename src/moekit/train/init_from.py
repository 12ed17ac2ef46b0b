"""A new run that starts from another run's weights (`train.init_from`): fine-tuning, or adding a
multi-token-prediction module to a trained model (the MTP module the source lacks keeps its fresh
initialization; train it alone with `--train.freeze=model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from moekit.model import MoETransformer
from moekit.train.checkpoint import load_weights
from moekit.train.sample import find_run, read_run_tokenizer

# The model settings a run may change from its source's: its MTP module, and training-only ones
# (the balance losses' weights, the aux-loss-free bias's rate). Any other changes the function
# the weights compute, so the weights would not be the source model's.
MAY_CHANGE = frozenset({
    "mtp_depth", "mtp_loss_weight", "mtp_target", "aux_loss_coef", "z_loss_coef",
    "importance_loss_coef", "load_loss_coef", "bias_update_rate",
})  # fmt: skip


def initialize_from(source: str | Path, model: MoETransformer, tokenizer: Tokenizer) -> str:
    """Stream the newest checkpoint of the run `source` (or that checkpoint directory) into
    `model`, this run's freshly built model, whose data gives `tokenizer`. Raises ValueError
    saying what to do when the source is not a run, its model settings differ from this run's
    (but for MAY_CHANGE; this run may add MTP depths, not drop them), or it was trained with
    another tokenizer; nothing is loaded then. Returns a line saying what was loaded."""
    where = f"train.init_from={str(source)!r}"
    try:
        cfg, checkpoint = find_run(source)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(
            f"{where}: {error} (a Hugging Face checkpoint: `moekit convert --from-hf` it to a run "
            "first)"
        ) from None
    ours = model.cfg
    differ = _differences(cfg.model.to_dict(), ours.to_dict(), "model.")
    if ours.mtp_depth < cfg.model.mtp_depth:
        differ.append(f"model.mtp_depth ({cfg.model.mtp_depth} there, {ours.mtp_depth} here)")
    if differ:
        raise ValueError(
            f"{where}: its model differs from this run's in {'; '.join(differ)}; give its "
            f"settings (its config.json) for those: only the MTP module (which may be added), the "
            "balance losses' weights and the bias update rate may change"
        )
    if read_run_tokenizer(checkpoint.parent.parent).to_str() != tokenizer.to_str():
        raise ValueError(
            f"{where} was trained with another tokenizer than this run's data settings give: "
            "train with the source's train.data (its config.json), or copy its tokenizer.json "
            "into the new run directory and set train.data.tokenizer=run"
        )
    added = ours.mtp_depth > cfg.model.mtp_depth
    try:
        load_weights(checkpoint, model, may_lack="mtp." if added else None)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return f"weights from {checkpoint}" + (" (the MTP module starts fresh)" if added else "")


def _differences(theirs: dict[str, Any], ours: dict[str, Any], prefix: str) -> list[str]:
    """'name (their value there, ours here)' for each setting outside MAY_CHANGE that differs."""
    out = []
    for key in sorted(theirs.keys() | ours.keys()):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b and key not in MAY_CHANGE:
            out.append(f"{prefix}{key} ({a!r} there, {b!r} here)")
    return out
