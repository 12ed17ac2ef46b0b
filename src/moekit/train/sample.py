"""A trained run: read its config, newest (or a given) checkpoint and tokenizer."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from moekit.config import RUN_FILE_REMEDY, RunConfig
from moekit.model import MoETransformer
from moekit.quant.files import empty_quantized_model, read_quantization
from moekit.train.checkpoint import (
    CHECKPOINT_DIR,
    is_hf_checkpoint,
    latest_checkpoint,
    load_weights,
)
from moekit.userfiles import read_tokenizer


def find_run(path: str | Path) -> tuple[RunConfig, Path]:
    """The config and the checkpoint directory of a run directory written by `moekit train` (its
    newest checkpoint) or of one of its checkpoint directories (checkpoints/step-NNNNNN)."""
    path = Path(path)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path
    cfg = read_run_config(run_dir)
    checkpoint = latest_checkpoint(run_dir) if path == run_dir else path
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/step-*)")
    return cfg, checkpoint


def read_run_config(run_dir: Path) -> RunConfig:
    """The config.json of a run directory; a directory without one, or a Hugging Face checkpoint
    (weights beside its config.json, no checkpoints/), is one error saying what it is."""
    if is_hf_checkpoint(run_dir):
        raise ValueError(
            f"{run_dir} is a Hugging Face checkpoint, not a run directory: convert it to one "
            f"first (moekit convert --from-hf {run_dir} --out RUN_DIR)"
        )
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
    return RunConfig.from_file(run_dir / "config.json", RUN_FILE_REMEDY)


def load_run(path: str | Path) -> tuple[RunConfig, MoETransformer, Path]:
    """The config, the model with the checkpoint's weights (eval mode) and that checkpoint's
    directory, of a run directory or one of its checkpoints (`find_run`); a quantized checkpoint
    (`moekit quantize`) gives the quantized model. `moekit.load` reads runs through this, and
    adds the tokenizer."""
    cfg, checkpoint = find_run(path)
    quantization = read_quantization(checkpoint)
    if quantization is None:
        model = MoETransformer(cfg.model)
    else:  # allocated quantized: the float model is never built
        model = empty_quantized_model(cfg.model, quantization)
    load_weights(checkpoint, model)
    return cfg, model.eval(), checkpoint


def read_run_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer.json of a run directory."""
    remedy = (
        "copy the run again, or only its tokenizer.json: from the checkpoint it was converted "
        f"from, or (a run moekit trained) `moekit train --resume {run_dir} --train.steps=N` "
        "(N above its last step) writes it again"
    )
    return read_tokenizer(Path(run_dir) / "tokenizer.json", remedy)
