"""Token classes of Python source: each character gets the `tokenize` class of the source token
covering it, and each BPE token the class of most of the characters it covers."""

from __future__ import annotations

import io
import keyword
import tokenize
from collections import Counter

import numpy as np

CLASSES = ("keyword", "name", "operator", "number", "string", "comment", "whitespace", "other")
_INDEX = {name: i for i, name in enumerate(CLASSES)}
_STRING_TYPES = {tokenize.STRING} | {
    getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
    if hasattr(tokenize, n)
}  # fmt: skip
_LAYOUT_TYPES = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT}
# The class of each `tokenize` token type but NAME (a keyword or a name); any other is "other".
_CLASS_OF_TYPE = {tokenize.OP: "operator", tokenize.NUMBER: "number", tokenize.COMMENT: "comment"}
_CLASS_OF_TYPE |= dict.fromkeys(_STRING_TYPES, "string")
_CLASS_OF_TYPE |= dict.fromkeys(_LAYOUT_TYPES, "whitespace")


def source_class(tok: tokenize.TokenInfo) -> str:
    """The class of one `tokenize` token."""
    if tok.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(tok.string) else "name"
    return _CLASS_OF_TYPE.get(tok.type, "other")


def char_classes(text: str) -> np.ndarray:
    """(len(text),) int8: the class index of every character. Characters between tokens are
    whitespace; text after a point where `tokenize` fails (not Python) is "other"."""
    out = np.full(len(text), _INDEX["whitespace"], dtype=np.int8)
    starts = np.cumsum([0] + [len(line) + 1 for line in text.split("\n")])
    end = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            a = starts[tok.start[0] - 1] + tok.start[1]
            b = starts[tok.end[0] - 1] + tok.end[1]
            if tok.type not in _LAYOUT_TYPES and b > a:
                out[a:b] = _INDEX[source_class(tok)]
            end = max(end, b)
    except (tokenize.TokenError, SyntaxError):
        out[end:] = _INDEX["other"]
    return out


def token_classes(chars: np.ndarray, offsets: list[tuple[int, int]]) -> np.ndarray:
    """(N,) int8: per token, the most common class of the characters in its (start, end) offsets;
    a token covering no character (a special token) is "other"."""
    out = np.full(len(offsets), _INDEX["other"], dtype=np.int8)
    for i, (a, b) in enumerate(offsets):
        if b > a:
            out[i] = Counter(chars[a:b].tolist()).most_common(1)[0][0]
    return out
