"""Tokenised splits cached as numpy memmaps, and batches of random windows drawn from them.

A split is tokenised once per (tokenizer, split contents) and stored as a flat array of token ids
(documents joined by END_OF_TEXT) in uint16 or uint32; later runs map the file instead of
tokenising again. Batches are windows at random offsets drawn by a seeded `torch.Generator`, whose
state is saved in checkpoints so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor
from tqdm.auto import tqdm

from moekit.data.corpus import Split
from moekit.data.tokenizer import eos_id
from moekit.fileio import atomic_path, atomic_write_text
from moekit.userfiles import read_json

CHUNK_DOCS = 64  # documents tokenised per call: bounds the memory of the encodings


@dataclass(frozen=True)
class TokenSplit:
    """A split as one flat array of token ids, and the UTF-8 bytes of the text it encodes."""

    tokens: np.ndarray
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(self.n_tokens, 1)


def tokenize_split(
    tok: Tokenizer, split: Split, cache_dir: Path, progress: bool = False, name: str = "split"
) -> TokenSplit:
    """The split's tokens: mapped from the cache, else tokenised and cached (atomically)."""
    tok_hash = hashlib.sha256(tok.to_str().encode("utf-8")).hexdigest()[:16]
    stem = Path(cache_dir) / "tokens" / f"{tok_hash}-{split.fingerprint[:20]}"
    meta_path, bin_path = stem.with_suffix(".json"), stem.with_suffix(".bin")
    if meta_path.is_file() and bin_path.is_file():
        remedy = f"delete it and {bin_path.name} (a cache: the split is tokenised again)"
        meta = read_json(meta_path, remedy)
        return TokenSplit(np.memmap(bin_path, dtype=meta["dtype"], mode="r"), meta["n_bytes"])
    ids = _encode(tok, split, progress, name)
    with atomic_path(bin_path) as tmp:
        ids.tofile(tmp)
    meta = {"dtype": ids.dtype.name, "n_tokens": int(ids.shape[0]), "n_bytes": split.n_bytes}
    atomic_write_text(meta_path, json.dumps(meta))
    return TokenSplit(np.memmap(bin_path, dtype=ids.dtype, mode="r"), split.n_bytes)


def _encode(tok: Tokenizer, split: Split, progress: bool, name: str) -> np.ndarray:
    """All documents of the split, each followed by END_OF_TEXT, as one array."""
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32
    eos = np.array([eos_id(tok)], dtype=dtype)
    texts = [doc.text for doc in split.documents]
    parts = []
    starts = range(0, len(texts), CHUNK_DOCS)
    for start in tqdm(starts, desc=f"tokenising {name}", unit="chunk", disable=not progress):
        for enc in tok.encode_batch_fast(texts[start : start + CHUNK_DOCS]):
            parts += [np.asarray(enc.ids, dtype=dtype), eos]
    return np.concatenate(parts)


class WindowSampler:
    """Batches of `batch_size` windows of `seq_len` tokens at random offsets of `tokens`.

    `next_batch()` returns a (batch_size, seq_len) int64 tensor; a language model reads it as both
    input ids and labels (the model shifts the labels). The offsets come from a `torch.Generator`
    seeded with `seed`; `state_dict()` and `load_state_dict()` save and restore it.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.shape[0] < seq_len:
            raise ValueError(
                f"seq_len={seq_len} is invalid for this data: a window needs {seq_len} tokens "
                f"and the split has only {tokens.shape[0]}; use a shorter seq_len or more text"
            )
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self._span = np.arange(seq_len)

    def next_batch(self) -> Tensor:
        n_starts = self.tokens.shape[0] - self.seq_len + 1
        starts = torch.randint(0, n_starts, (self.batch_size,), generator=self.generator)
        windows = self.tokens[starts.numpy()[:, None] + self._span]
        return torch.from_numpy(windows.astype(np.int64))

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.generator.set_state(state["generator"])


def fixed_batches(
    tokens: np.ndarray, n_batches: int, batch_size: int, seq_len: int, seed: int = 1234
) -> list[Tensor]:
    """The same `n_batches` batches on every call: for evaluations comparable across steps."""
    sampler = WindowSampler(tokens, batch_size, seq_len, seed)
    return [sampler.next_batch() for _ in range(n_batches)]
