"""Safetensors checkpoint directories: find the files, read headers, stream tensors, write shards.

Reading goes through `safetensors.safe_open`, which maps each file into memory: the pages it
touches count against the process until the file is closed. `CheckpointReader` therefore closes
and reopens a file after every `REOPEN_BYTES` read from it, and reads large tensors in slices
along their first axis, so that loading needs the model's memory plus a bounded margin, not twice
the checkpoint. At most one file is open at a time.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from moekit.userfiles import REDOWNLOAD, DamagedFile, open_safetensors, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
REOPEN_BYTES = 32 * 2**20
SLICE_BYTES = 16 * 2**20

# safetensors' dtype names -> torch's (the file format's one table; `read_tensor` of the expert
# store and `CheckpointReader` read through it).
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
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

    Uses model.safetensors.index.json when there is one (sharded checkpoints), else the single
    model.safetensors. Every file's header is read and checked here, before any weight is.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        return _from_index(folder, index)
    single = folder / SINGLE_NAME
    if single.is_file():
        return {k: WeightInfo(single, *v) for k, v in read_header(single).items()}
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


class CheckpointReader:
    """Reads tensors of a checkpoint by name, whole or one slice of the first axis at a time."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self._open: dict[Path, Any] = {}
        self._read_since_open: dict[Path, int] = {}

    def read(self, key: str, rows: slice | int | None = None) -> Tensor:
        """The tensor `key`, or `tensor[rows]` (read from disk without the rest of it)."""
        handle = self._handle(key)
        tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows]
        self._count(self.files[key], tensor.numel() * tensor.element_size())
        return tensor

    def row_slices(self, key: str) -> Iterator[slice]:
        """Slices of the first axis of `key` of at most SLICE_BYTES each (one slice if 0-D/1-D)."""
        sl = self._handle(key).get_slice(key)
        shape = sl.get_shape()
        if len(shape) < 2:
            yield slice(None)
            return
        row_bytes = math.prod(shape[1:]) * DTYPES[sl.get_dtype()].itemsize
        step = max(1, SLICE_BYTES // max(row_bytes, 1))
        for start in range(0, shape[0], step):
            yield slice(start, min(start + step, shape[0]))

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def _handle(self, key: str) -> Any:
        """The open file holding `key`; any other file is closed first (tensors are read in
        model order, which is the order of the shards, so this rarely reopens a file)."""
        path = self.files[key]
        if path not in self._open:
            self.close()
            self._open[path] = safe_open(str(path), framework="pt").__enter__()
            self._read_since_open[path] = 0
        return self._open[path]

    def _count(self, path: Path, nbytes: int) -> None:
        """Close a file after REOPEN_BYTES read: unmapping drops the pages read from the page
        cache out of this process's memory."""
        self._read_since_open[path] += nbytes
        if self._read_since_open[path] >= REOPEN_BYTES:
            self._open.pop(path).__exit__(None, None, None)


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
