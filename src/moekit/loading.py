"""`moekit.load`: a model with its tokenizer and config, from a moekit run directory (its newest
checkpoint), one of a run's checkpoint directories, or a Hugging Face checkpoint directory. Every
command that reads a whole model reads it here; `moekit.inference.load_offloaded` reads a
checkpoint file itself, leaving the routed experts in it.

    loaded = moekit.load("runs/demo/moe")
    loaded.model, loaded.tokenizer, loaded.config
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moekit.config import RunConfig
from moekit.interop.convert import hf_run_config
from moekit.interop.hf import load_hf, resolve_dtype
from moekit.model import MoETransformer
from moekit.train.checkpoint import CHECKPOINT_DIR, list_checkpoints
from moekit.train.sample import load_run, read_run_tokenizer
from moekit.userfiles import REDOWNLOAD, read_tokenizer


@dataclass
class Loaded:
    """What `load` read. model: in eval mode, on the CPU. tokenizer: None only where it was not
    required and the directory has no tokenizer.json. config: the run's; for a Hugging Face
    directory, the one `moekit convert --from-hf` writes for it. checkpoints: the run's
    checkpoints up to the loaded one, oldest first (none for a Hugging Face directory)."""

    model: MoETransformer
    tokenizer: Tokenizer | None
    config: RunConfig
    checkpoints: list[Path]


def load(
    path: str | Path, *, dtype: torch.dtype | str | None = None, require_tokenizer: bool = True
) -> Loaded:
    """The model, tokenizer and config of `path`: a run directory (its newest checkpoint), a
    checkpoint directory of a run (RUN_DIR/checkpoints/step-NNNNNN) or a Hugging Face checkpoint
    directory (see `moekit.interop.load_hf`).

    dtype: of the weights ("float32", "bfloat16", "float16" or a torch dtype); None keeps the
    stored one (a run's float32, a Hugging Face config's "dtype"). The routers' correction biases
    stay float32. require_tokenizer: False reads tokenizer.json only where there is one.
    """
    path = Path(path)
    has_config = (path / "config.json").is_file()
    # A Hugging Face directory holds its weights beside config.json; a run, in checkpoints/ (none
    # yet before its first checkpoint, which `load_run` says; a trace file may sit beside it).
    is_run = (path / CHECKPOINT_DIR).is_dir()
    if has_config and not is_run and (any(path.glob("*.safetensors*")) or any(path.glob("*.bin"))):
        model = load_hf(path, dtype)
        has_tokenizer = require_tokenizer or (path / "tokenizer.json").is_file()
        tokenizer = read_tokenizer(path / "tokenizer.json", REDOWNLOAD) if has_tokenizer else None
        return Loaded(model, tokenizer, hf_run_config(model.cfg), [])
    if has_config or is_run or path.parent.name == CHECKPOINT_DIR:
        config, model, checkpoint = load_run(path)
        if dtype is not None:
            for param in model.parameters():
                param.data = param.data.to(resolve_dtype(dtype, {}))
        run_dir = checkpoint.parent.parent
        found = list_checkpoints(run_dir)
        checkpoints = found[: found.index(checkpoint) + 1] if checkpoint in found else [checkpoint]
        has_tokenizer = require_tokenizer or (run_dir / "tokenizer.json").is_file()
        tokenizer = read_run_tokenizer(run_dir) if has_tokenizer else None
        return Loaded(model, tokenizer, config, checkpoints)
    raise FileNotFoundError(
        f"{path} is neither a run directory ({CHECKPOINT_DIR}/) nor a Hugging Face checkpoint "
        "directory (config.json)"
    )
