"""Data: the split is deterministic and by file, caches are reused, samplers restore exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moekit.data import (
    WindowSampler,
    byte_tokenizer,
    cached_bpe,
    eos_id,
    find_files,
    load_corpus,
    tokenize_split,
)
from moekit.data import tokenizer as tokenizer_module
from moekit.data import tokens as tokens_module


def write_corpus(folder: Path, n_files: int = 40) -> Path:
    """A folder of small Python-like files in two subfolders."""
    for i in range(n_files):
        path = folder / f"pkg{i % 2}" / f"mod_{i:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n" * (5 + i % 3))
    return folder


def test_split_is_by_file_and_deterministic(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus")
    first = load_corpus(str(folder), val_fraction=0.2)
    again = load_corpus(str(folder), val_fraction=0.2)
    train_names = [d.name for d in first.train.documents]
    val_names = [d.name for d in first.val.documents]
    assert train_names == [d.name for d in again.train.documents]
    assert val_names == [d.name for d in again.val.documents]
    assert val_names and not set(train_names) & set(val_names)
    assert len(train_names) + len(val_names) == 40
    whole = {d.name: (folder / d.name).read_text() for d in first.val.documents}
    assert all(doc.text == whole[doc.name] for doc in first.val.documents)


def test_adding_files_does_not_move_existing_ones(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus", n_files=20)
    before = {d.name for d in load_corpus(str(folder), val_fraction=0.2).val.documents}
    write_corpus(folder, n_files=40)
    after = {d.name for d in load_corpus(str(folder), val_fraction=0.2).val.documents}
    assert before == {name for name in after if int(name[-5:-3]) < 20}


def test_stdlib_corpus_is_python_sources_without_test_suites() -> None:
    root, files = find_files("stdlib")
    assert len(files) > 300 and files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    assert (root / "json" / "decoder.py").relative_to(root) in files


def test_bad_data_path_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*missing\.txt' is not a file.*stdlib"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_single_file_splits_by_lines(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = load_corpus(str(path), val_fraction=0.1)
    assert corpus.val.documents[0].text.startswith("line 90\n")
    assert corpus.train.documents[0].text + corpus.val.documents[0].text == path.read_text()


def test_bpe_is_trained_once_then_loaded_from_the_cache(tmp_path: Path, monkeypatch) -> None:
    split = load_corpus(str(write_corpus(tmp_path / "corpus"))).train
    first = cached_bpe(split, 300, tmp_path / "cache")

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached tokenizer should have been loaded")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = cached_bpe(split, 300, tmp_path / "cache")
    assert second.get_vocab() == first.get_vocab() and first.get_vocab_size() == 300


def test_tokens_are_cached_as_a_memmap(tmp_path: Path, monkeypatch) -> None:
    split = load_corpus(str(write_corpus(tmp_path / "corpus"))).train
    tok = byte_tokenizer()
    first = tokenize_split(tok, split, tmp_path / "cache")
    monkeypatch.setattr(tokens_module, "_encode", lambda *a: pytest.fail("re-tokenised"))
    second = tokenize_split(tok, split, tmp_path / "cache")
    assert isinstance(second.tokens, np.memmap) and second.tokens.dtype == np.uint16
    assert np.array_equal(first.tokens, second.tokens)
    assert second.n_tokens == split.n_bytes + len(split.documents)  # one end-of-text per file


def test_byte_tokenizer_ids_are_the_utf8_bytes() -> None:
    tok = byte_tokenizer()
    text = "def f():\n\treturn 'héllo'\x00"
    assert tok.encode(text).ids == list(text.encode("utf-8"))
    assert tok.decode(tok.encode(text).ids) == text and eos_id(tok) == 256


def test_sampler_state_restores_the_same_batches() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = WindowSampler(tokens, batch_size=4, seq_len=16, seed=7)
    sampler.next_batch()
    state = {k: v.clone() for k, v in sampler.state_dict().items()}
    expected = [sampler.next_batch() for _ in range(3)]
    restored = WindowSampler(tokens, batch_size=4, seq_len=16, seed=999)
    restored.load_state_dict(state)
    assert all(torch.equal(a, restored.next_batch()) for a in expected)


def test_sampler_windows_are_contiguous_text() -> None:
    batch = WindowSampler(np.arange(500, dtype=np.uint16), 3, 10, seed=0).next_batch()
    assert batch.dtype == torch.long and batch.shape == (3, 10)
    assert torch.equal(batch - batch[:, :1], torch.arange(10).expand(3, 10))


def test_glob_source_reads_only_matching_files(tmp_path: Path) -> None:
    folder = write_corpus(tmp_path / "corpus")
    (folder / "pkg0" / "notes.txt").write_text("not python\n" * 10)
    corpus = load_corpus(str(folder / "pkg0" / "*.py"), val_fraction=0.2)
    names = [d.name for d in corpus.train.documents + corpus.val.documents]
    assert len(names) == 20 and all(name.endswith(".py") for name in names)
    assert set(names) == {p.name for p in (folder / "pkg0").glob("*.py")}  # named from pkg0/


def test_a_glob_names_its_files_from_its_folder_however_it_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The split hashes a file's name relative to the corpus root: a glob's root is the folder
    before its first wildcard, so an absolute and a relative spelling, or the folder itself,
    split the same files the same way (absolute names would differ from machine to machine)."""
    folder = write_corpus(tmp_path / "corpus")

    def split(source: str) -> tuple[list[str], list[str]]:
        corpus = load_corpus(source, val_fraction=0.3)
        return ([d.name for d in corpus.train.documents], [d.name for d in corpus.val.documents])

    monkeypatch.chdir(tmp_path)
    relative = split("corpus/**/*.py")
    assert relative == split(str(folder / "**" / "*.py")) == split(str(folder))
    assert relative[1] and all(not Path(n).is_absolute() for n in relative[0] + relative[1])
