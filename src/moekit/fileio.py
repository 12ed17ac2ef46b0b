"""Atomic file and directory writes (write under a temporary name, then rename), and where
moekit caches what it derives (tokenised corpora, compiled kernels).

A crash or Ctrl-C in the middle of a write leaves the previous file (or nothing) behind, never a
half-written file under the final name. A place that cannot be written (a file where a directory
must be or the other way round, a directory this process may not write in) is one
`FileExistsError` or `PermissionError` naming it, which the command line prints as one line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    Works for files and directories alike: whatever the block creates at the yielded path replaces
    `path` (an existing file is replaced atomically; an existing directory is swapped out first).
    """
    final = Path(path).absolute()  # (".": a name to put the temporary beside)
    make_dirs(final.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    except OSError as err:
        raise _write_error(final, err) from None
    tmp.rmdir()  # the caller decides whether this becomes a file or a directory
    try:
        yield tmp
        _replace(tmp, final)
    finally:
        remove_path(tmp)


def _replace(src: Path, dst: Path) -> None:
    if dst.exists() and dst.is_dir() != src.is_dir():  # which os.replace cannot do
        kinds = ("a directory", "a file") if dst.is_dir() else ("a file", "a directory")
        raise FileExistsError(
            f"cannot write {dst}: it is {kinds[0]}, and what goes there is {kinds[1]}; move it "
            "away or choose another path"
        )
    if dst.is_dir() and src.is_dir():
        old = dst.with_name(f".{dst.name}.old")
        remove_path(old)
        os.replace(dst, old)
        os.replace(src, dst)
        remove_path(old)
    else:
        os.replace(src, dst)


def make_dirs(path: str | os.PathLike) -> Path:
    """Create the directory `path` and those above it that are missing (`mkdir -p`); a file in
    the way, or a directory this process may not write in, is one error naming it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _write_error(path, err) from None
    return path


def check_no_file_in_the_way(path: str | os.PathLike, *, file_ok: bool = False) -> None:
    """The FileExistsError `make_dirs(path)` would raise for a file at `path` or above it, before
    anything is made; with `file_ok`, `path` is a file to write and only the directories above it
    are checked."""
    path = Path(path)
    for place in path.parents if file_ok else (path, *path.parents):
        if place.exists() and not place.is_dir():
            raise FileExistsError(
                f"cannot write {path}: {place} is a file, not a directory; move it away or "
                "choose another path"
            )
        if place.is_symlink() and not place.exists():  # writing would replace the link, or fail
            raise FileExistsError(
                f"cannot write {path}: {place} is a link to {os.readlink(place)}, which does not "
                "exist; remove the link or choose another path"
            )


def check_writable_file(path: str | os.PathLike) -> None:
    """What writing a file at `path` (`atomic_write_*`, its folders made) would refuse, checked
    before the work that makes it: a directory at `path`, a file above it, or a folder that may
    not be written in (a temporary file is made and removed in the nearest existing one)."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"cannot write {path}: it is a directory; give a file's path")
    check_no_file_in_the_way(path, file_ok=True)
    folder = next((p for p in path.parents if p.is_dir()), Path("."))
    try:
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise _write_error(path, err) from None


def check_new_path(path: str | os.PathLike, remedy: str) -> None:
    """What a command that writes something new at `path` (a run directory, a trace) refuses,
    checked before anything is read: FileExistsError where `path` exists (`remedy`: what to do),
    an empty folder too (`atomic_path` would swap it out, with its owner, permissions and
    whatever came into it meanwhile, and cannot replace a mount point or the working directory),
    or a file stands where a directory on its way must go."""
    path = Path(path)
    if path.exists():
        made = " (an empty folder: the command makes its own, so remove it)" if _empty(path) else ""
        raise FileExistsError(f"{path} exists{made}; {remedy}")
    check_no_file_in_the_way(path)  # (a link to nothing too)


def _empty(path: Path) -> bool:
    """Whether `path` is a directory with nothing in it (one that cannot be read: False)."""
    try:
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def check_own_folder(path: str | os.PathLike, markers: tuple[str, ...], what: str) -> None:
    """Refuse a folder `path` that holds files but none of `markers` (what a `what`, "an
    analysis" say, writes there: a file or folder): writing would mix into, or replace the files
    of, something else (a run's report.md)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not any((path / m).exists() for m in markers):
        raise FileExistsError(
            f"{path} holds other files than {what} (it has no {' or '.join(markers)}); choose "
            "another --out, or empty it yourself"
        )


def _write_error(path: Path, err: OSError) -> OSError:
    """`err`, raised creating `path` or a directory (or a temporary beside it) on the way, as an
    error that names `path` and says what is in the way: a file (FileExistsError), a directory
    that may not be written in (PermissionError), or else the system's reason, as the same
    kind of error (a file system that takes no new files, a full disk)."""
    if isinstance(err, (FileExistsError, NotADirectoryError)):
        try:
            check_no_file_in_the_way(path)
        except FileExistsError as found:
            return found
    folder = next((p for p in path.parents if p.is_dir()), path.parent)
    reason = (err.strerror or str(err)).lower()
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PermissionError(
            f"cannot write {path}: {folder} may not be written in ({reason}); choose a directory "
            "you can write in"
        )
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(
            f"cannot write {path}: {folder} has no room ({reason}); free some space or choose a "
            "directory on another disk"
        )
    return type(err)(
        f"cannot write {path}: creating it in {folder} failed ({reason}); choose a directory "
        "you can write in"
    )


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: object) -> str:
    """Write `data` as indented JSON (one trailing newline) to `path` atomically; return the JSON
    text, which the benchmark scripts also print."""
    text = json.dumps(data, indent=2)
    atomic_write_text(path, text + "\n")
    return text


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 110) -> None:
    """Write a matplotlib `Figure` to `path` as a PNG atomically. Build figures as bare `Figure`s
    (they render with Agg), not with pyplot, whose registry would keep them alive."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def default_cache_dir() -> Path:
    """$MOEKIT_CACHE if set, else ~/.cache/moekit (or $XDG_CACHE_HOME/moekit)."""
    if os.environ.get("MOEKIT_CACHE"):
        return Path(os.environ["MOEKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit"
