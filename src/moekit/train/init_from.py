"""A new run that starts from another run's weights (`train.init_from`): fine-tuning, or adding a
multi-token-prediction module to a trained model (the weights the source lacks, the MTP module's
only, keep their fresh initialization; train them alone with `--train.freeze=model`)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moekit.model import MoETransformer
from moekit.train.checkpoint import load_weights
from moekit.train.sample import find_run, read_run_tokenizer


def initialize_from(source: str | Path, model: MoETransformer, tokenizer: Tokenizer) -> str:
    """Copy the newest checkpoint of the run `source` (or that checkpoint directory) into
    `model`, this run's freshly built model whose data gives `tokenizer`. Raises ValueError, with
    what to do, when the weights do not fit (another architecture, tensors of other shapes, a
    module ours lacks) or the source was trained on another tokenizer. Returns a line saying
    what was loaded and what starts fresh."""
    cfg, checkpoint = find_run(source)
    run_dir = checkpoint.parent.parent
    if read_run_tokenizer(run_dir).to_str() != tokenizer.to_str():
        raise ValueError(
            f"train.init_from={str(source)!r} was trained with another tokenizer than this run's "
            f"data settings give: train with the source's train.data (its config.json), or copy "
            f"its tokenizer.json into the new run directory and set train.data.tokenizer=run"
        )
    weights = MoETransformer(cfg.model)
    load_weights(checkpoint, weights)
    try:
        missing, unexpected = model.load_state_dict(weights.state_dict(), strict=False)
    except RuntimeError as error:  # shapes: its message lists each mismatch
        raise ValueError(
            f"train.init_from={str(source)!r}: its weights do not fit this run's model "
            f"({str(error).splitlines()[-1].strip()}); give the model settings of its "
            "config.json, changing only what keeps the shapes"
        ) from None
    fresh = [name for name in missing if not name.startswith("mtp.")]
    if unexpected or fresh:
        what = f"tensors this model lacks: {unexpected[:3]}" if unexpected else (
            f"tensors the source lacks: {fresh[:3]}")  # fmt: skip
        raise ValueError(
            f"train.init_from={str(source)!r}: its weights do not fit this run's model ({what}); "
            "give the model settings of its config.json (only an MTP module may be added)"
        )
    added = " (the MTP module starts from fresh weights)" if missing else ""
    return f"weights from {checkpoint}{added}"
