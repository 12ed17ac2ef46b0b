"""Tokenizers: byte-level BPE trained with the `tokenizers` library, or plain bytes.

Both are `tokenizers.Tokenizer` objects (saved as `tokenizer.json`, loadable by Hugging Face
`PreTrainedTokenizerFast`), with one special token, END_OF_TEXT, that separates documents. A trained
BPE is cached on disk under a key made of the training text's fingerprint and the vocabulary size,
so a second run on the same corpus loads it instead of training again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moekit.data.corpus import Split
from moekit.fileio import atomic_path
from moekit.userfiles import read_tokenizer

END_OF_TEXT = "<|endoftext|>"
BYTES_VOCAB_SIZE = 257  # 256 byte values + END_OF_TEXT
# What a checkpoint keeps beside its tokenizer.json for a chat: special tokens, the chat template,
# the end tokens (`moekit.interop.chat` reads them; a new run copies them with its tokenizer).
CHAT_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json", "generation_config.json")  # fmt: skip


def copy_chat_files(source: Path, dest: Path) -> None:
    """The CHAT_FILES of folder `source` that exist, copied into folder `dest` (replacing one
    there); `dest` is its callers' temporary folder, renamed into place whole."""
    for name in CHAT_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(dest) / name)


def byte_tokenizer() -> Tokenizer:
    """One token per UTF-8 byte (token id = byte value), and END_OF_TEXT = 256."""
    vocab = {ch: byte for byte, ch in enumerate(_byte_characters())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _byte_level(tok, use_regex=False)
    tok.add_special_tokens([END_OF_TEXT])
    return tok


def train_bpe(split: Split, vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE of at most `vocab_size` tokens (END_OF_TEXT included) on a split."""
    if vocab_size <= BYTES_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is invalid: a byte-level BPE needs more than "
            f"{BYTES_VOCAB_SIZE} tokens (256 bytes + {END_OF_TEXT}); use tokenizer='bytes' instead"
        )
    tok = Tokenizer(models.BPE())
    _byte_level(tok, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    texts = [doc.text for doc in split.documents]
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def cached_bpe(
    split: Split, vocab_size: int, cache_dir: Path, show_progress: bool = False
) -> Tokenizer:
    """The BPE for this training split and vocabulary size: loaded from the cache, else trained
    and stored there (atomically)."""
    path = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{split.fingerprint[:20]}.json"
    if path.is_file():
        return read_tokenizer(path, "delete it (a cache: the tokenizer is trained again)")
    tok = train_bpe(split, vocab_size, show_progress)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return tok


# The end-of-text tokens of the checkpoints people convert, after moekit's own: Llama/Mixtral,
# Llama 3, Qwen (chat end), DeepSeek-V3, GPT-OSS. The first one a tokenizer has is its end of text.
END_TOKENS = (END_OF_TEXT, "</s>", "<|end_of_text|>", "<|im_end|>", "<｜end▁of▁sentence｜>",
              "<|return|>")  # fmt: skip


def eos_id(tok: Tokenizer) -> int:
    """The id of the tokenizer's end-of-text token: the first of END_TOKENS it has."""
    for token in END_TOKENS:
        if (token_id := tok.token_to_id(token)) is not None:
            return token_id
    raise ValueError(
        f"this tokenizer has none of the end-of-text tokens moekit knows ({', '.join(END_TOKENS)}),"
        " which separate documents in training and end generation; add one to its tokenizer.json"
    )


def _byte_characters() -> list[str]:
    """The printable character that byte-level BPE (GPT-2) writes for each byte value 0-255:
    printable Latin-1 bytes stand for themselves, the others for 256 + their rank."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    others = iter(range(256, 512))  # 256 + the rank of each byte that is not printable
    return [chr(byte if byte in printable else next(others)) for byte in range(256)]


def _byte_level(tok: Tokenizer, use_regex: bool) -> None:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
