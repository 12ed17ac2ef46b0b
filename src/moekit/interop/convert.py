"""`moekit convert --from-hf`: a Hugging Face checkpoint directory as a moekit run directory.

A run directory (as `moekit train` writes it) holds config.json (a `RunConfig`), tokenizer.json
and checkpoints/step-NNNNNN/model.safetensors. `hf_to_run` writes one with the imported weights
as checkpoint step 0 (what `moekit generate` reads and `train --resume` fine-tunes); the way back,
`convert --to-hf`, is `moekit.load` then `save_hf`.
"""

from __future__ import annotations

from pathlib import Path

from moekit.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from moekit.fileio import check_new_path
from moekit.interop.hf import load_hf, read_hf_model_config
from moekit.train.checkpoint import write_new_run
from moekit.userfiles import REDOWNLOAD, read_tokenizer


def hf_run_config(model_cfg: ModelConfig) -> RunConfig:
    """The run config of an imported checkpoint: its model, default training settings, and its own
    tokenizer (no BPE is trained for a converted model)."""
    train = TrainConfig(
        seq_len=min(TrainConfig().seq_len, model_cfg.max_seq_len),
        data=DataConfig(tokenizer="run"),
    )
    return RunConfig(model=model_cfg, train=train)


def hf_to_run(hf_dir: str | Path, out: str | Path, *, dtype: str | None = None) -> Path:
    """Import a Hugging Face checkpoint as a run directory: its weights as checkpoint step 0
    (which `moekit train --resume OUT` fine-tunes), its tokenizer.json copied when it has one,
    with its chat files (template, special and end tokens). Refuses an existing `out`."""
    check_new_path(out, "choose a new run directory")
    model_cfg = read_hf_model_config(hf_dir)
    cfg = hf_run_config(model_cfg)  # validated before any weight is read
    tokenizer = Path(hf_dir) / "tokenizer.json"
    if tokenizer.is_file():  # read before anything is written: it must load and fit the model
        vocab = read_tokenizer(tokenizer, REDOWNLOAD).get_vocab_size()
        if vocab > model_cfg.vocab_size:
            raise ValueError(
                f"{tokenizer} has {vocab} tokens, more than the model's vocab_size="
                f"{model_cfg.vocab_size}: the checkpoint's files do not belong together"
            )
    model = load_hf(hf_dir, dtype=dtype, progress=True)
    cfg = cfg.replace(model=model.cfg)  # mtp_depth: the MTP layers the checkpoint holds
    return write_new_run(Path(out), cfg, model, tokenizer if tokenizer.is_file() else None)
