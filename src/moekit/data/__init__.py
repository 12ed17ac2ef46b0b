"""Corpora and tokenizers: text in, cached token arrays and batch samplers out.

`prepare_data(cfg, vocab_size)` is the one call a training run makes: it reads the corpus, splits it
by file, trains (or loads from the cache) the tokenizer on the training split, and tokenises both
splits (or maps them from the cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from moekit.config import DataConfig
from moekit.data.corpus import Document, find_files, load_corpus
from moekit.data.tokenizer import byte_tokenizer, cached_bpe, eos_id
from moekit.data.tokens import TokenSplit, WindowSampler, fixed_batches, tokenize_split
from moekit.fileio import default_cache_dir
from moekit.userfiles import read_tokenizer


@dataclass(frozen=True)
class Data:
    """A tokenizer and the two tokenised splits of a corpus."""

    tokenizer: Tokenizer
    train: TokenSplit
    val: TokenSplit
    n_train_files: int
    n_val_files: int


def prepare_data(
    cfg: DataConfig, vocab_size: int, progress: bool = False, run_dir: Path | None = None
) -> Data:
    """Read, split, tokenise and cache the corpus of `cfg`; `vocab_size` sizes a BPE tokenizer;
    tokenizer "run" reads `run_dir`/tokenizer.json."""
    cache = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    corpus = load_corpus(cfg.source, cfg.val_fraction, cfg.max_files)
    if cfg.tokenizer == "bytes":
        tok = byte_tokenizer()
    elif cfg.tokenizer == "run":
        tok = run_tokenizer(run_dir)
    else:
        tok = cached_bpe(corpus.train, cfg.vocab_size or vocab_size, cache, progress)
    train = tokenize_split(tok, corpus.train, cache, progress, "train")
    val = tokenize_split(tok, corpus.val, cache, progress, "validation")
    return Data(tok, train, val, len(corpus.train.documents), len(corpus.val.documents))


def run_tokenizer(run_dir: Path | None) -> Tokenizer:
    """The tokenizer.json a run directory brought with it (tokenizer "run")."""
    path = Path(run_dir or ".") / "tokenizer.json"
    if run_dir is None or not path.is_file():
        raise FileNotFoundError(
            f"train.data.tokenizer='run' reads the run directory's tokenizer.json, and {path} does "
            "not exist: copy the checkpoint's tokenizer.json there, or train a new one with "
            "--train.data.tokenizer=bpe (or bytes)"
        )
    return read_tokenizer(path, "copy the checkpoint's tokenizer.json there again")


__all__ = [
    "Data",
    "Document",
    "WindowSampler",
    "byte_tokenizer",
    "cached_bpe",
    "eos_id",
    "find_files",
    "fixed_batches",
    "load_corpus",
    "prepare_data",
    "tokenize_split",
]
