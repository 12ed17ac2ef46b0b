"""`moekit.load`: a model with its tokenizer and config, from a moekit run directory (its newest
checkpoint), one of a run's checkpoint directories, or a Hugging Face checkpoint directory. Every
command that reads a model reads it here, whole or (`experts=`, a run's checkpoint) with its routed
experts left in the checkpoint file behind a cache (`moekit.inference.load_offloaded`).

    loaded = moekit.load("runs/demo/moe")
    loaded.model, loaded.tokenizer, loaded.config
    offloaded = moekit.load("runs/demo/moe", experts="25%")  # offloaded.offload: the cache
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from moekit.config import OffloadConfig, RunConfig
from moekit.inference.offload import ExpertOffload, load_offloaded
from moekit.inference.trace import load_trace
from moekit.interop.convert import hf_run_config
from moekit.interop.hf import (
    is_transformers_config,
    load_hf,
    read_hf_model_config,
    resolve_dtype,
)
from moekit.model import MoETransformer
from moekit.quant.files import read_quantization
from moekit.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_remedy,
    is_hf_checkpoint,
    list_checkpoints,
)
from moekit.train.sample import find_run, load_run, read_run_tokenizer
from moekit.userfiles import REDOWNLOAD, read_tokenizer


@dataclass
class Loaded:
    """What `load` read. model: in eval mode, on the CPU. tokenizer: None only where it was not
    required and the directory has no tokenizer.json. config: the run's; for a Hugging Face
    directory, the one `moekit convert --from-hf` writes for it. checkpoints: the run's
    checkpoints up to the loaded one, oldest first (none for a Hugging Face directory).
    offload: with `load(..., experts=budget)`, the experts' cache and store (statistics in
    `offload.stats()`; `offload.close()` when done); None when every expert is in memory.
    folder: the directory of the tokenizer files (the run's, or the Hugging Face one), where a
    chat template lives (`moekit.interop.chat`)."""

    model: MoETransformer
    tokenizer: Tokenizer | None
    config: RunConfig
    checkpoints: list[Path]
    offload: ExpertOffload | None = None
    folder: Path | None = None


def load(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    experts: int | float | str | OffloadConfig | None = None,
    require_tokenizer: bool = True,
    keep_quantized: bool = True,
) -> Loaded:
    """The model, tokenizer and config of `path`: a run directory (its newest checkpoint), a
    checkpoint directory of a run (RUN_DIR/checkpoints/step-NNNNNN) or a Hugging Face checkpoint
    directory (see `moekit.interop.load_hf`).

    dtype: of the weights ("float32", "bfloat16", "float16" or a torch dtype); None keeps the
    stored one (a run's float32, a Hugging Face config's "dtype"). The routers' correction biases
    stay float32. require_tokenizer: False reads tokenizer.json only where there is one.
    experts: None keeps every expert in memory. A budget (`moekit generate --offload.budget`'s
    forms: a count (12), a fraction of all experts (0.5 or "50%") or bytes ("200MB")) leaves the
    routed experts of a run's checkpoint in its file, at most the budget of them in memory behind
    an LRU cache; an `OffloadConfig` gives the budget with the cache's policy, prefetch and
    trace (its budget None: every expert in memory). The whole model is then never in memory
    (`moekit.inference.load_offloaded`); the weights keep the checkpoint's dtype. A Hugging Face
    directory is offloaded once converted to a run (`moekit convert --from-hf`).
    keep_quantized: a Hugging Face checkpoint's MXFP4 experts (GPT-OSS) stay MXFP4 as shipped
    (`QuantizedExperts`; the model needs about the checkpoint's memory, ~13 GB for gpt-oss-20b
    instead of ~42 GB in bfloat16), the rest loads in `dtype`; False dequantizes them too (to
    `dtype`, bfloat16 by default). FP8 weights (DeepSeek-V3) are dequantized either way. A run
    (`moekit quantize`) is read as it is stored.
    """
    path = Path(path)
    offload = _offloaded(experts)
    if offload is not None and dtype is not None:
        raise ValueError(
            f"dtype={dtype!r} with experts={offload[0]!r}: offloaded experts are read as the "
            "checkpoint stores them; convert the checkpoint to that dtype instead "
            "(moekit convert --dtype)"
        )
    if _kind(path) == "hf":
        if offload is not None:
            raise ValueError(
                f"{path} is a Hugging Face directory: an expert budget ({offload[0]!r}) offloads "
                f"the experts of a run's checkpoint; convert it first (moekit convert --from-hf "
                f"{path} --out RUN_DIR) and load the run"
            )
        model = load_hf(path, dtype, keep_quantized=keep_quantized)
        has_tokenizer = require_tokenizer or (path / "tokenizer.json").is_file()
        tokenizer = read_tokenizer(path / "tokenizer.json", REDOWNLOAD) if has_tokenizer else None
        return Loaded(model, tokenizer, hf_run_config(model.cfg), [], folder=path)
    if offload is None:
        config, model, checkpoint = load_run(path)
        if dtype is not None:
            for param in model.parameters():
                param.data = param.data.to(resolve_dtype(dtype, {}))
    else:
        config, checkpoint = find_run(path)
    run_dir = checkpoint.parent.parent
    found = list_checkpoints(run_dir)
    checkpoints = found[: found.index(checkpoint) + 1] if checkpoint in found else [checkpoint]
    has_tokenizer = require_tokenizer or (run_dir / "tokenizer.json").is_file()
    tokenizer = read_run_tokenizer(run_dir) if has_tokenizer else None
    if offload is None:
        return Loaded(model, tokenizer, config, checkpoints, folder=run_dir)
    model, cache = _load_offloaded_run(config, checkpoint, *offload)
    return Loaded(model, tokenizer, config, checkpoints, cache, folder=run_dir)


def read_config(path: str | Path) -> RunConfig:
    """The config `load(path)` gives, read without a weight (a run's config.json, or the one
    `moekit convert --from-hf` writes for a Hugging Face directory): what a command checks its
    settings against (the model's max_seq_len, say) before the model is read."""
    path = Path(path)
    if _kind(path) == "hf":
        return hf_run_config(read_hf_model_config(path))
    return find_run(path)[0]


def read_model_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer `load(path)` gives (a run's tokenizer.json, or the Hugging Face
    directory's), read without the model: for checking text against the model's context first."""
    path = Path(path)
    if _kind(path) == "hf":
        return read_tokenizer(path / "tokenizer.json", REDOWNLOAD)
    return read_run_tokenizer(find_run(path)[1].parent.parent)


def is_hf_directory(path: str | Path) -> bool:
    """Whether `load` reads `path` as a Hugging Face checkpoint directory (a path that is neither
    that nor a run is `load`'s error)."""
    return _kind(Path(path)) == "hf"


def _kind(path: Path) -> str:
    """ "hf" (a Hugging Face checkpoint directory: its weights beside config.json, or a
    config.json of transformers' form, weights or none) or "run" (a run directory or one of its
    checkpoints); any other path is one error saying what to give instead."""
    if path.is_file():
        folder = path.parent
        if (folder / "config.json").is_file() or folder.parent.name == CHECKPOINT_DIR:
            raise ValueError(f"{path} is a file: give the folder that holds it ({folder})")
        raise ValueError(
            f"{path} is a file: give a run directory ({CHECKPOINT_DIR}/) or a Hugging Face "
            "checkpoint directory (config.json)"
        )
    has_config = (path / "config.json").is_file()
    if has_config and (is_hf_checkpoint(path) or _hf_config(path)):
        return "hf"
    if has_config or (path / CHECKPOINT_DIR).is_dir() or path.parent.name == CHECKPOINT_DIR:
        return "run"
    raise FileNotFoundError(
        f"{path} is neither a run directory ({CHECKPOINT_DIR}/) nor a Hugging Face checkpoint "
        "directory (config.json)"
    )


def _hf_config(path: Path) -> bool:
    """Whether the config.json of `path`, a folder without checkpoints/, is transformers'
    (`is_transformers_config`); one that cannot be read is left to the run's reader, which names
    the damage."""
    if (path / CHECKPOINT_DIR).is_dir():
        return False
    try:
        data = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return is_transformers_config(data)


def _offloaded(
    experts: int | float | str | OffloadConfig | None,
) -> tuple[int | float | str, OffloadConfig] | None:
    """`load`'s experts= as (budget, the cache's settings); None when every expert stays in
    memory."""
    if isinstance(experts, OffloadConfig):
        return None if experts.budget is None else (experts.budget, experts)
    if experts is None:
        return None
    if isinstance(experts, bool) or not isinstance(experts, int | float | str):
        raise ValueError(
            f"experts={experts!r} is invalid: give None (every expert in memory), a budget (a "
            "count (12), a fraction (0.5 or '50%') or bytes ('200MB')) or an OffloadConfig"
        )
    return experts, OffloadConfig()  # the cache's default settings


def _load_offloaded_run(
    config: RunConfig, checkpoint: Path, budget: int | float | str, offload: OffloadConfig
) -> tuple[MoETransformer, ExpertOffload]:
    """The model of a run's `checkpoint` directory with its routed experts left in the file (a
    quantized run's, `moekit quantize`, in their quantized format)."""
    counts = None
    if offload.trace is not None:
        counts = load_trace(offload.trace, config.model).expert_counts()
    return load_offloaded(
        checkpoint / "model.safetensors",
        config.model,
        remedy=checkpoint_remedy(checkpoint),
        quantization=read_quantization(checkpoint),
        budget=budget,
        policy=offload.policy,
        prefetch=offload.prefetch,
        expert_counts=counts,
    )
