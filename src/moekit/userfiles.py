"""Reading the files a user hands us: configs, run directories, checkpoints, tokenizers, indexes;
and the one safetensors reader of bounded memory (`CheckpointReader`).

Whatever the libraries raise for a file that cannot be read (safetensors' `SafetensorError`,
`json`'s position without the file's name, `tokenizers`' bare `Exception`, a
`UnicodeDecodeError`) becomes one `DamagedFile`, a `ValueError` that names the file, says what is
wrong with it and what to do:

    runs/a/checkpoints/step-000012/model.safetensors is not a readable safetensors file (truncated
    or corrupt, 1,024 bytes: incomplete metadata, file not fully covered); delete
    runs/a/checkpoints/step-000012 to fall back on step-000008 (...), or copy the run again

What to do (`remedy`) depends on where the file comes from, so every reader takes it from its
caller. The command line prints a `ValueError` as one line and exits 2 (`moekit.cli`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

REDOWNLOAD = "download or copy the checkpoint again"
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


class DamagedFile(ValueError):
    """A file that exists but cannot be read as what it should be: truncated, corrupt, not JSON,
    not UTF-8, or holding the wrong kind of data."""

    def __init__(self, path: str | Path, problem: str, remedy: str) -> None:
        self.path, self.problem, self.remedy = Path(path), problem, remedy
        super().__init__(f"{path} {problem}; {remedy}")


@contextmanager
def reading(
    path: str | Path, remedy: str, error: type[DamagedFile] = DamagedFile
) -> Iterator[None]:
    """Turn what reading `path` inside the block raises into one clear error (`error`, a
    `DamagedFile` or a subclass, for damaged contents; `FileNotFoundError` for a missing file;
    `ValueError` for a file that cannot be opened at all, such as a directory)."""
    path = Path(path)
    try:
        yield
    except UnicodeDecodeError as err:
        raise error(path, f"is not UTF-8 text (byte {err.start:,} is invalid)", remedy) from None
    except SafetensorError as err:
        size = path.stat().st_size if path.is_file() else 0
        detail = _lower(str(err).removeprefix("Error while deserializing header: "))
        problem = f"truncated or corrupt, {size:,} bytes: {detail}"
        raise error(path, f"is not a readable safetensors file ({problem})", remedy) from None
    except FileNotFoundError:
        if path.exists():
            raise
        raise FileNotFoundError(f"{path} does not exist; {remedy}") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory, not a file") from None
    except PermissionError:
        raise ValueError(f"{path} cannot be read: permission denied") from None


def _lower(message: str) -> str:
    """ "Expecting value" -> "expecting value" (it goes mid-sentence)."""
    return message[:1].lower() + message[1:]


def json_problem(err: json.JSONDecodeError) -> str:
    """What `json` says is wrong, to go before " at <where>" mid-sentence ("unterminated string
    starting", not "Unterminated string starting at")."""
    return _lower(err.msg.removesuffix(" at"))


def read_text(path: str | Path, remedy: str, error: type[DamagedFile] = DamagedFile) -> str:
    """The UTF-8 text of `path`."""
    with reading(path, remedy, error):
        return Path(path).read_text(encoding="utf-8")


def read_json(
    path: str | Path,
    remedy: str,
    error: type[DamagedFile] = DamagedFile,
    expect: type = dict,
    unique_keys: bool = False,
) -> Any:
    """The JSON value of `path`, which must be an `expect` (dict: a JSON object; list: an array);
    with `unique_keys` (a settings file a user wrote), a key given twice in an object is refused
    (JSON keeps the last, silently)."""
    text = read_text(path, remedy, error)
    return parse_json(text, path, remedy, error, expect, unique_keys=unique_keys)


def parse_json(
    text: str,
    path: str | Path,
    remedy: str,
    error: type[DamagedFile] = DamagedFile,
    expect: type = object,
    line: int | None = None,
    unique_keys: bool = False,
) -> Any:
    """The JSON value of `text`, read from `path` (all of it, or its line number `line`); with
    `unique_keys`, an object that gives a key twice is refused."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        twice = [k for i, k in enumerate(keys) if k in keys[:i]]
        if twice:
            raise error(path, f"gives the key {twice[0]!r} twice (JSON keeps the last)", remedy)
        return dict(pairs)

    try:
        value = json.loads(text, object_pairs_hook=unique if unique_keys else None)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno + (line or 1) - 1}, column {err.colno}"
        raise error(path, f"is not valid JSON ({json_problem(err)} at {where})", remedy) from None
    if not isinstance(value, expect):
        kind = {dict: "an object", list: "an array"}.get(expect, expect.__name__)
        where = "" if line is None else f" on line {line}"
        raise error(path, f"holds a JSON {_json_kind(value)}{where}, not {kind}", remedy)
    return value


def read_json_lines(path: str | Path, remedy: str, expect: type = object) -> list[Any]:
    """The JSON value (an `expect`) of every non-empty line of `path` (a .jsonl log). A last line
    without its newline that is not JSON is dropped: what a writer killed mid-line leaves."""
    text = read_text(path, remedy)
    lines = text.splitlines()
    if lines and not text.endswith("\n") and not _is_json(lines[-1]):
        lines.pop()
    return [
        parse_json(text, path, remedy, DamagedFile, expect, line=number)
        for number, text in enumerate(lines, start=1)
        if text.strip()
    ]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return kinds.get(type(value), "number")


@contextmanager
def open_safetensors(
    path: str | Path, remedy: str, error: type[DamagedFile] = DamagedFile
) -> Iterator[Any]:
    """`safetensors.safe_open(path)` (a truncated or corrupt file fails here, at its header),
    closed after the block; what reading it inside the block raises is reported as `reading`
    does."""
    with reading(path, remedy, error):
        if Path(path).is_dir():  # which safetensors reports as "No such device (os error 19)"
            raise IsADirectoryError(path)
        if Path(path).exists() and not Path(path).is_file():  # a device or a pipe: the same
            raise ValueError(f"{path} is not a regular file (a device or a pipe); {remedy}")
        with safe_open(str(path), framework="pt") as handle:
            yield handle


def read_safetensors(path: str | Path, remedy: str) -> dict[str, Any]:
    """Every tensor of a safetensors file, by name."""
    with open_safetensors(path, remedy) as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not iterable)


def read_tokenizer(path: str | Path, remedy: str) -> Any:
    """A `tokenizers.Tokenizer` from its tokenizer.json."""
    from tokenizers import Tokenizer

    text = read_text(path, remedy)
    parse_json(text, path, remedy, expect=dict)  # a JSON error with the path and the position
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises a bare Exception for every bad file
        raise DamagedFile(path, f"is not a tokenizer ({_lower(str(err))})", remedy) from None


class CheckpointReader:
    """Reads tensors of safetensors files by name ({name: file}), whole or one slice of the first
    axis at a time, in bounded memory: `safetensors.safe_open` maps a file into memory and the
    pages it touches count against the process until the file is closed, so a file is closed
    and reopened after every REOPEN_BYTES read from it, and at most one file is open at a time.
    Loading then needs the model's memory plus a bounded margin, not twice the checkpoint."""

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
