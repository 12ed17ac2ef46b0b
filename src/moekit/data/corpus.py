"""Text corpora: the Python standard library, or the user's files, split into train and validation.

The split is by file and deterministic: a file is held out for validation when a hash of its path
(relative to the corpus root) falls below `val_fraction`, so the same file lands in the same split
on every machine and every run, whatever else is added to the corpus.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib"
# Directories of the standard library that are not code a user would write: test suites,
# third-party packages, the codec tables of `encodings` (hex literals) and `pydoc_data` (750 KB of
# English help text in one string; it alone would be most of the validation split).
STDLIB_SKIP = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                         "encodings", "pydoc_data", "__pycache__"})  # fmt: skip


@dataclass(frozen=True)
class Document:
    """One text of a corpus: its path relative to the corpus root, and its contents."""

    name: str
    text: str


@dataclass(frozen=True)
class Split:
    """The documents of one split in sorted order; the fingerprint hashes names and contents."""

    documents: tuple[Document, ...]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for doc in self.documents:
            digest.update(doc.name.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
        return digest.hexdigest()

    @property
    def n_bytes(self) -> int:
        return sum(len(doc.text.encode("utf-8")) for doc in self.documents)


@dataclass(frozen=True)
class Corpus:
    """A corpus split into train and validation documents."""

    train: Split
    val: Split


def load_corpus(source: str, val_fraction: float = 0.05, max_files: int | None = None) -> Corpus:
    """Read `source` ("stdlib", a text file, a folder of text files or a glob) and split it by file.

    `max_files` keeps only the first N files (sorted by relative path). A single file is split at a
    line boundary instead: its last `val_fraction` of lines are the validation text.
    """
    root, paths = find_files(source)
    docs = [doc for doc in (_read(root, p) for p in paths[:max_files]) if doc is not None]
    if not docs:
        raise ValueError(f"data source {source!r} has no readable UTF-8 text files")
    if len(docs) == 1:
        return Corpus(*_split_lines(docs[0], val_fraction))
    hashes = [_path_hash(doc.name) for doc in docs]
    held = [h < val_fraction for h in hashes]
    if not any(held):  # a small corpus may hash no file below the fraction: hold out one
        held[hashes.index(min(hashes))] = True
    if all(held):
        held[hashes.index(max(hashes))] = False
    train = tuple(d for d, h in zip(docs, held, strict=True) if not h)
    val = tuple(d for d, h in zip(docs, held, strict=True) if h)
    return Corpus(Split(train), Split(val))


def find_files(source: str) -> tuple[Path, list[Path]]:
    """The corpus root and its files (relative to the root, sorted) for a data source."""
    if source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, sorted(p for p in _walk(root, skip=STDLIB_SKIP) if p.suffix == ".py")
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent, [Path(path.name)]
    if path.is_dir():
        return path, sorted(_walk(path))
    matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file())
    if matches:  # named from the pattern's folder, as a folder's files are: however it is spelled
        root = Path(*itertools.takewhile(lambda part: not WILDCARD.search(part), path.parts[:-1]))
        return root, [m.relative_to(root) for m in matches]
    raise FileNotFoundError(
        f"data source {source!r} is not a file, a folder, or a glob matching any file; use "
        f"'{STDLIB}' (the Python standard library), a text file, a folder of text files, "
        "or a glob such as 'docs/**/*.md'"
    )


WILDCARD = re.compile(r"[*?[]")  # what makes a part of a path a glob pattern (glob's rule)


def _path_hash(name: str) -> float:
    """A stable number in [0, 1) from a relative path (same on every machine and Python)."""
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:12], 16) / 16**12


def _walk(root: Path, skip: frozenset[str] = frozenset()) -> list[Path]:
    """Files under `root` (relative paths), not entering hidden or `skip` directories."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip and not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [rel / f for f in files if not f.startswith(".")]
    return found


def _read(root: Path, rel: Path) -> Document | None:
    """The file as a Document; None for files that are not UTF-8 text (binaries in a folder)."""
    try:
        text = (root / rel).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return Document(rel.as_posix(), text) if text and "\0" not in text else None


def _split_lines(doc: Document, val_fraction: float) -> tuple[Split, Split]:
    lines = doc.text.splitlines(keepends=True)
    if len(lines) < 2:
        raise ValueError(
            f"data source {doc.name!r} is a single file of one line: it cannot be split into "
            "train and validation text; give a longer file or a folder"
        )
    cut = min(len(lines) - 1, max(1, round(len(lines) * (1 - val_fraction))))
    train = Document(doc.name, "".join(lines[:cut]))
    val = Document(doc.name + ":validation", "".join(lines[cut:]))
    return Split((train,)), Split((val,))
