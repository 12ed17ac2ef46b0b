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
# Those a resumed run may change (`moekit train --resume RUN --model.KEY=VALUE`): the same but
# the MTP module, whose weights and optimizer state a run's checkpoint holds or lacks.
RESUME_MAY_CHANGE = MAY_CHANGE - {"mtp_depth"}


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
    changes = model_changes(cfg.model, ours)
    differ = describe_changes(changes, "there")
    if ours.mtp_depth < cfg.model.mtp_depth:
        mtp = f"model.mtp_depth ({cfg.model.mtp_depth} there, {ours.mtp_depth} here)"
        differ = f"{differ}; {mtp}" if differ else mtp
    if differ:
        raise ValueError(
            f"{where}: its model differs from this run's in {differ}; give its "
            "settings (its config.json) for those: only the MTP module (which may be added), "
            "expert_impl, max_seq_len and the training-only settings of the balancing may change"
        )
    return cfg, checkpoint


def tokenizer_dir(run_dir: Path, tokenizer: str, source: tuple[RunConfig, Path] | None) -> Path:
    """Where train.data.tokenizer "run" reads tokenizer.json: the run's folder, or, for a new run
    from `source`'s weights (`init_source`) whose folder holds none, the source run's: the ids
    its weights were trained on (the new run keeps a copy)."""
    if source is None or tokenizer != "run" or (run_dir / "tokenizer.json").is_file():
        return run_dir
    return source[1].parent.parent


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


def model_changes(
    theirs: ModelConfig, ours: ModelConfig, may_change: frozenset[str] = MAY_CHANGE
) -> list[tuple[str, Any, Any]]:
    """(name, their value, ours) for each model setting outside `may_change` that differs, named
    from the model ("model.moe.top_k"); head counts and widths as the model uses them."""
    return _differences(_comparable(theirs), _comparable(ours), "model.", may_change)


def describe_changes(changes: list[tuple[str, Any, Any]], there: str) -> str:
    """`model_changes` in words: "model.moe.top_k (2 there, 1 here); ..." (`there`: where their
    values are); a nested config reads as a few words, not its whole dict."""
    return "; ".join(
        f"{name} ({_shown(name, a)} {there}, {_shown(name, b)} here)" for name, a, b in changes
    )


def _shown(name: str, value: Any) -> str:
    """A setting's value in a line: an MoE layer or another nested config in a few words."""
    if name.endswith(".moe"):
        return (
            "None (dense)"
            if value is None
            else f"{value['n_experts']} experts top-{value['top_k']}"
        )
    if isinstance(value, dict):
        return "set"
    text = repr(value)
    return text if len(text) <= 60 else text[:56] + "...)"


def _comparable(cfg: ModelConfig) -> dict[str, Any]:
    """cfg's settings, with the head counts and widths as the model uses them (None -> derived)."""
    return cfg.to_dict() | {"n_kv_heads": cfg.kv_heads, "head_dim": cfg.d_head}


def _differences(
    theirs: dict[str, Any], ours: dict[str, Any], prefix: str, may_change: frozenset[str]
) -> list[tuple[str, Any, Any]]:
    """(name, their value, ours) for each setting outside `may_change` that differs."""
    out = []
    for key in sorted(theirs.keys() | ours.keys()):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.", may_change)
        elif a != b and key not in may_change:
            out.append((f"{prefix}{key}", a, b))
    return out
