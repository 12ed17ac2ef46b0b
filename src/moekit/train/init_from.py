"""A new run that starts from another run's weights (`train.init_from`): fine-tuning, or adding a
multi-token-prediction module to a trained model (the MTP depths the source lacks keep their fresh
initialization; train them alone with `--train.freeze=model`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from moekit.config import ModelConfig, RunConfig
from moekit.model import MoETransformer
from moekit.train.checkpoint import CHECKPOINT_DIR, load_weights, refuse_quantized
from moekit.train.sample import find_run, read_run_tokenizer

# The model settings a run may change from its source's: its MTP module, how the experts are
# computed, the context length (no weight depends on it), and training-only ones (the balance
# losses, the aux-loss-free bias's rate). Any other changes the function the weights compute.
MAY_CHANGE = frozenset({
    "mtp_depth", "mtp_loss_weight", "mtp_target", "expert_impl", "max_seq_len", "aux_loss_coef",
    "aux_loss_scope", "z_loss_coef", "importance_loss_coef", "load_loss_coef", "bias_update_rate",
    "noise_eps",
})  # fmt: skip


def init_source(source: str | Path, ours: ModelConfig) -> tuple[RunConfig, Path]:
    """The config and checkpoint of the run `source` (its newest checkpoint, or that checkpoint
    directory), checked against this run's model before any data is read: ValueError, saying
    what to do, if it is not a run or its model settings differ from `ours` but for MAY_CHANGE
    (this run may add MTP depths, not drop them)."""
    where, path = f"train.init_from={str(source)!r}", Path(source)
    if not ((path / CHECKPOINT_DIR).is_dir() or path.parent.name == CHECKPOINT_DIR):
        raise ValueError(
            f"{where} is not a run directory (no {CHECKPOINT_DIR}/): give one `moekit train` "
            "wrote; a Hugging Face checkpoint: `moekit convert --from-hf` it to a run first"
        )
    try:
        cfg, checkpoint = find_run(path)
        refuse_quantized(checkpoint)  # (load_weights would, after the data is prepared)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    differ = _differences(_comparable(cfg.model), _comparable(ours), "model.")
    if ours.mtp_depth < cfg.model.mtp_depth:
        differ.append(f"model.mtp_depth ({cfg.model.mtp_depth} there, {ours.mtp_depth} here)")
    if differ:
        raise ValueError(
            f"{where}: its model differs from this run's in {'; '.join(differ)}; give its "
            "settings (its config.json) for those: only the MTP module (which may be added), "
            "expert_impl, max_seq_len and the training-only settings of the balancing may change"
        )
    return cfg, checkpoint


def initialize_from(
    source: tuple[RunConfig, Path], model: MoETransformer, tokenizer: Tokenizer
) -> str:
    """Stream the `init_source` checkpoint into `model`, this run's freshly built model, whose
    data gives `tokenizer` (ValueError if the source was trained with another). Returns a line
    saying what was loaded and what starts fresh."""
    cfg, checkpoint = source
    where = f"train.init_from={str(checkpoint)!r}"
    if read_run_tokenizer(checkpoint.parent.parent).to_str() != tokenizer.to_str():
        raise ValueError(
            f"{where} was trained with another tokenizer than this run's data settings give: "
            "train with the source's train.data (its config.json), or copy its tokenizer.json "
            "into the new run directory and set train.data.tokenizer=run"
        )
    have, want = cfg.model.mtp_depth, model.cfg.mtp_depth
    fresh = tuple(f"mtp.{k}." for k in range(have, want))
    try:
        load_weights(checkpoint, model, may_lack=fresh)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    depths = (
        f"MTP depth {want} starts" if want == have + 1 else f"MTP depths {have + 1}-{want} start"
    )
    return f"weights from {checkpoint}" + (f" ({depths} fresh)" if fresh else "")


def _comparable(cfg: ModelConfig) -> dict[str, Any]:
    """cfg's settings, with the head counts and widths as the model uses them (None -> derived)."""
    return cfg.to_dict() | {"n_kv_heads": cfg.kv_heads, "head_dim": cfg.d_head}


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
