"""Routing over labelled held-out text: every MoE layer's choices for each token, with the token's
class and domain (recorded by `moekit.inference.trace.TraceRecorder`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from moekit.analysis.token_classes import CLASSES, char_classes, token_classes
from moekit.data import Document, eos_id
from moekit.inference.trace import TraceRecorder
from moekit.model import MoETransformer

TOP_LEVEL = "(top level)"  # the domain of a file at the corpus root (a stdlib module, not package)


@dataclass(frozen=True)
class LabelledTokens:
    """A token stream with, per token, its `tokenize` class and the index of its domain."""

    token_ids: np.ndarray
    token_class: np.ndarray
    domain: np.ndarray
    domains: list[str]


@dataclass(frozen=True)
class RoutingTrace:
    """Per MoE layer, the (T, K) expert ids of T tokens; new_seq (T,) marks sequence starts."""

    tokens: LabelledTokens
    new_seq: Tensor
    ids: list[Tensor]
    entropy: list[float]


def domain_of(name: str) -> str:
    """The package a corpus file belongs to: its first folder ("json/decoder.py" -> "json")."""
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else TOP_LEVEL


def label_tokens(tok: Tokenizer, documents: Sequence[Document], n_tokens: int) -> LabelledTokens:
    """`n_tokens` tokens spread over all the documents (a prefix of each, so that every domain is
    seen), each prefix followed by END_OF_TEXT (class "other")."""
    if not documents:
        raise ValueError("analysis needs held-out text: the documents given are empty")
    ids, classes, domain, domains = [], [], [], {}
    per_doc = -(-n_tokens // len(documents))
    for doc in documents:
        enc = tok.encode(doc.text)
        d = domains.setdefault(domain_of(doc.name), len(domains))
        n = min(len(enc.ids), per_doc)
        ids += [np.asarray(enc.ids[:n], dtype=np.int64), np.array([eos_id(tok)])]
        labels = token_classes(char_classes(doc.text), enc.offsets[:n])
        classes += [labels, [CLASSES.index("other")]]
        domain.append(np.full(n + 1, d))
    cat = [np.concatenate(x)[:n_tokens] for x in (ids, classes, domain)]
    return LabelledTokens(cat[0], cat[1].astype(np.int64), cat[2], list(domains))


@torch.no_grad()
def record_routing(
    model: MoETransformer, tokens: LabelledTokens, seq_len: int, batch_size: int = 8
) -> RoutingTrace:
    """Run the model over consecutive windows of `seq_len` tokens and keep each layer's top-k
    (after capacity), recorded by the one routing recorder, `TraceRecorder`."""
    ids_T = torch.from_numpy(tokens.token_ids)
    windows = list(torch.split(ids_T, seq_len))
    tail = [windows.pop()[None]] if windows and len(windows[-1]) < seq_len else []  # alone
    starts = range(0, len(windows), batch_size)
    batches = [torch.stack(windows[i : i + batch_size]) for i in starts] + tail
    with TraceRecorder(model) as rec:
        for batch in batches:
            model(batch)
    new_seq = torch.zeros(len(ids_T), dtype=torch.bool)
    new_seq[::seq_len] = True
    ids = [torch.cat(layer) for layer in zip(*rec.kept, strict=True)]
    sizes = [len(call[0]) for call in rec.kept]  # each batch's mean entropy weighs its tokens
    entropy = [float(np.average(e, weights=sizes)) for e in zip(*rec.entropy, strict=True)]
    return RoutingTrace(tokens, new_seq, ids, entropy)
