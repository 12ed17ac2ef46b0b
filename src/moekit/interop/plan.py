"""What `load_hf` reads, checked before any weight is: which of a checkpoint's tensors fill which
of the model's (key maps, `interop.keymaps`), their shapes against the config, the MTP layers
kept or dropped, and the copies of a tensor (`Architecture.copies`) that must equal it. Every
problem is one `CheckpointError` listing all the missing, unexpected and misshapen tensors."""

from __future__ import annotations

import re
import warnings

import torch

from moekit.config import ModelConfig
from moekit.interop.architecture import Architecture
from moekit.interop.files import CheckpointError, WeightInfo
from moekit.interop.keymaps import Source, expected_shapes, placements
from moekit.interop.quantized import QuantizedView
from moekit.model import MoETransformer
from moekit.userfiles import CheckpointReader

_LISTED = 12  # how many missing / unexpected keys an error lists
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.")


def choose_mtp(
    cfg: ModelConfig, files: dict[str, WeightInfo], keep: bool
) -> tuple[ModelConfig, set[str]]:
    """The config to load (its mtp_depth what the checkpoint holds and the caller keeps) and the
    checkpoint keys left out on purpose (the MTP layers' when keep is False)."""
    first, end = cfg.n_layers, cfg.n_layers + cfg.mtp_depth
    layers = {k: _LAYER_KEY.match(k) for k in files}
    mtp = {k for k, m in layers.items() if m is not None and first <= int(m.group(1)) < end}
    if not mtp:
        return cfg.replace(mtp_depth=0), set()
    if not keep:
        warnings.warn(
            f"load_hf(mtp=False) drops the checkpoint's multi-token-prediction module "
            f"({len(mtp)} tensors of model.layers.{first}..{end - 1}); load with mtp=True "
            "(the default) to keep it",
            stacklevel=3,
        )
        return cfg.replace(mtp_depth=0), mtp
    return cfg, set()


def check_copies(arch: Architecture, cfg: ModelConfig, reader: CheckpointReader) -> None:
    """Refuse a checkpoint whose copies (`Architecture.copies`) differ from their originals:
    moekit keeps one tensor for both."""
    for copy, original in arch.copies(cfg).items():
        for rows in reader.row_slices(original):
            part = None if rows == slice(None) else rows
            if not torch.equal(reader.read(copy, part), reader.read(original, part)):
                raise CheckpointError(
                    f"this {arch.model_type} checkpoint's {copy} differs from {original}: moekit "
                    "shares one tensor between them, so it loads only equal copies"
                )


def plan_load(
    model: MoETransformer, arch: Architecture, view: QuantizedView, dropped: set[str]
) -> list[tuple[str, Source, list[str]]]:
    """(moekit tensor's name, source, checkpoint keys) for every tensor the checkpoint must fill;
    raises `CheckpointError` listing all missing, unexpected and misshapen tensors at once
    (`dropped` keys are left out on purpose, the architecture's copies are checked, not loaded).
    Keys and shapes are the dense ones of `view` (a quantized tensor's dense form)."""
    keymap, cfg, files = arch.keys, model.cfg, view.files
    buffers = {name for name, _ in model.named_buffers()}
    plan, used, missing, wrong = [], set(), [], []
    for name, tensor in model.state_dict(keep_vars=True).items():
        options = placements(keymap, name, cfg)
        if options is None:
            if name in buffers:
                continue  # e.g. a correction bias the architecture does not have: stays zero
            raise CheckpointError(
                f"{arch.model_type}: moekit parameter {name} has no place in the key map"
            )
        found = [(s, keys) for s, keys in options if all(k in files for k in keys)]
        if not found:
            best = max(options, key=lambda o: sum(k in files for k in o[1]))[1]
            missing += [k for k in best if k not in files]
            continue
        source, keys = found[0]
        for key, shape in expected_shapes(source, tuple(tensor.shape), keys).items():
            if files[key].shape != shape:
                wrong.append(view.misshapen(key, shape))
        wrong += view.check_op(source.op, keys)
        plan.append((name, source, keys))
        used.update(keys)
    for copy, original in arch.copies(cfg).items():
        if copy not in files:
            missing.append(copy)
        elif original in files and files[copy].shape != files[original].shape:
            wrong.append(
                f"{copy} has shape {files[copy].shape}, {original} {files[original].shape}"
            )
        used.add(copy)
    used |= dropped
    # not part of the model: the rotary tables older checkpoints kept, a tied model's head
    used |= {k for k in files if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        used.add("lm_head.weight")
    unexpected = sorted(k for k in files if k not in used)
    _raise_if_any(arch.model_type, missing, unexpected, wrong)
    return plan


def _raise_if_any(arch: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", wrong)):
        if keys:
            more = f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
            problems.append(f"{len(keys)} {what}: " + ", ".join(keys[:_LISTED]) + more)
    if problems:
        raise CheckpointError(
            f"this {arch} checkpoint does not fit its config: " + "; ".join(problems)
        )
