"""Safetensors checkpoint directories: find the files, read headers, stream tensors, write shards.

Tensors are read through `moekit.userfiles.CheckpointReader` (the one bounded-memory reader, which
training checkpoints load through too): loading needs the model's memory plus a bounded margin,
not twice the checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from safetensors.torch import save_file

from moekit.userfiles import (  # the tensor-file reader and its dtype table live there
    REDOWNLOAD,
    DamagedFile,
    open_safetensors,
    read_json,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The dtypes weights are loaded or saved in, by torch's name (as config.json's "dtype" gives it).
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: unsupported, incomplete, mismatched or corrupt."""


class DamagedCheckpoint(CheckpointError, DamagedFile):
    """A file of a Hugging Face checkpoint that cannot be read (truncated, corrupt, not JSON)."""


def read_checkpoint_json(path: Path) -> dict[str, Any]:
    """A JSON object of a Hugging Face checkpoint directory (config.json, the index)."""
    return read_json(path, REDOWNLOAD, DamagedCheckpoint)


class WeightInfo(NamedTuple):
    """Where one tensor of a checkpoint is, and its header's dtype ("BF16" ...) and shape."""

    path: Path
    dtype: str
    shape: tuple[int, ...]


def find_weight_files(folder: Path) -> dict[str, WeightInfo]:
    """Map every tensor name of a checkpoint directory to the safetensors file holding it.

    The single model.safetensors where there is one, else the shards model.safetensors.index.json
    lists: transformers' order, so a folder holding both loads the model transformers loads.
    Every file's header is read and checked here, before any weight is.
    """
    single = folder / SINGLE_NAME
    if single.is_file():
        return {k: WeightInfo(single, *v) for k, v in read_header(single).items()}
    index = folder / INDEX_NAME
    if index.is_file():
        return _from_index(folder, index)
    found = sorted(p.name for p in folder.glob("*.bin")) if folder.is_dir() else []
    hint = f" (found {found}: PyTorch .bin checkpoints are not read; convert them)" if found else ""
    raise CheckpointError(f"{folder} has neither {SINGLE_NAME} nor {INDEX_NAME}{hint}")


def _from_index(folder: Path, index: Path) -> dict[str, WeightInfo]:
    weight_map = read_checkpoint_json(index).get("weight_map")
    valid = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    if not valid:
        problem = "is not a safetensors index (no weight_map of tensor names to file names)"
        raise DamagedCheckpoint(index, problem, REDOWNLOAD)
    files: dict[str, WeightInfo] = {}
    headers: dict[str, dict[str, Any]] = {}
    for key, name in weight_map.items():
        path = folder / name
        if name not in headers:
            if not path.is_file():
                raise CheckpointError(f"{index} lists {name} (for {key}), which does not exist")
            headers[name] = read_header(path)
        if key not in headers[name]:
            raise CheckpointError(f"{index} places {key} in {name}, which does not hold it")
        files[key] = WeightInfo(path, *headers[name][key])
    return files


def read_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} of a safetensors file; a truncated or corrupt file raises
    `CheckpointError` saying so."""
    with open_safetensors(path, REDOWNLOAD, DamagedCheckpoint) as f:
        names = f.keys()  # safe_open is not iterable
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in names}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" or ".5GB" (the one size parser:
    shard sizes, expert budgets in bytes, command-line sizes)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d*\.?\d+)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size={size!r} is invalid: use bytes or e.g. '5GB', '500MB'")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** " KMGT".index(unit.upper() or " "))


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Split (name, bytes) in order into shards of at most max_shard_bytes (a larger tensor gets a
    shard of its own)."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, nbytes in sizes:
        if shards[-1] and filled + nbytes > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    return shards


def write_shards(folder: Path, shards: list[list[str]], make: Any, total_size: int) -> None:
    """Write each shard with `make(names) -> {name: tensor}`; an index when there are several.

    One shard's tensors exist at a time (safetensors serialises a shard in memory)."""
    names = (
        [SINGLE_NAME]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file_name, shard in zip(names, shards, strict=True):
        save_file(make(shard), str(folder / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file_name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
