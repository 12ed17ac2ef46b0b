"""`moekit convert`: Hugging Face checkpoint directories <-> moekit run directories.

A run directory (as `moekit train` writes it) holds config.json (a `RunConfig`), tokenizer.json
and checkpoints/step-NNNNNN/model.safetensors. `run_to_hf` exports the newest checkpoint;
`hf_to_run` writes a run directory with the imported weights as checkpoint step 0 (what
`moekit generate` and `convert --to-hf` read).
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.config import RUN_FILE_REMEDY, DataConfig, RunConfig, TrainConfig
from moekit.interop.hf import hf_model_config, load_hf, read_hf_config, save_hf
from moekit.model import MoETransformer
from moekit.train.checkpoint import latest_checkpoint, load_weights, write_new_run
from moekit.train.sample import read_run_tokenizer
from moekit.userfiles import REDOWNLOAD, read_tokenizer


def load_run_model(run_dir: str | Path) -> tuple[RunConfig, MoETransformer, Path]:
    """The config, the model with the newest checkpoint's weights, and that checkpoint's path."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
    cfg = RunConfig.from_file(run_dir / "config.json", RUN_FILE_REMEDY)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/step-*)")
    with torch.device("meta"):
        model = MoETransformer(cfg.model)
    model.to_empty(device="cpu")
    for buffer in model.buffers():  # the non-persistent ones; the checkpoint holds the rest
        buffer.zero_()
    load_weights(checkpoint, model)
    return cfg, model.eval(), checkpoint


def run_to_hf(
    run_dir: str | Path,
    out: str | Path,
    arch: str,
    *,
    layout: str = "per_expert",
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Export a run's newest checkpoint (and its tokenizer) as a Hugging Face checkpoint."""
    _, model, _ = load_run_model(run_dir)
    has_tokenizer = (Path(run_dir) / "tokenizer.json").is_file()
    return save_hf(
        model,
        out,
        arch,
        tokenizer=read_run_tokenizer(run_dir) if has_tokenizer else None,
        layout=layout,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
    )


def hf_to_run(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Import a Hugging Face checkpoint as a run directory: its weights as checkpoint step 0
    (which `moekit train --resume OUT` fine-tunes), its tokenizer.json copied when it has one.
    Refuses an existing `out`."""
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; choose a new run directory")
    model_cfg = hf_model_config(read_hf_config(hf_dir))
    # Fine-tuning keeps the checkpoint's own tokenizer: no BPE is trained for a converted model.
    train = TrainConfig(
        seq_len=min(TrainConfig().seq_len, model_cfg.max_seq_len),
        data=DataConfig(tokenizer="run"),
    )
    cfg = RunConfig(model=model_cfg, train=train)  # validated before any weight is read
    tokenizer = Path(hf_dir) / "tokenizer.json"
    if tokenizer.is_file():  # read before anything is written: it must load and fit the model
        vocab = read_tokenizer(tokenizer, REDOWNLOAD).get_vocab_size()
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"{tokenizer} has {vocab} tokens, more than the model's vocab_size="
                f"{model_cfg.vocab_size}: the checkpoint's files do not belong together"
            )
    model = load_hf(hf_dir, dtype=dtype, progress=True)
    return write_new_run(Path(out), cfg, model, tokenizer if tokenizer.is_file() else None)
