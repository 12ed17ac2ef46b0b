"""`moekit analyze`: load a run directory or a Hugging Face checkpoint, trace its routing over
held-out text, and write the report."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from moekit.analysis import metrics
from moekit.analysis.report import layer_stats, write_report
from moekit.analysis.trace import LabelledTokens, label_tokens, record_routing
from moekit.data import load_corpus
from moekit.fileio import check_no_file_in_the_way
from moekit.loading import load, read_config


class FewerTokens(UserWarning):
    """The held-out text has fewer tokens than asked (`analyze` traces them all)."""


SATURATION_TOKENS = 4096  # tokens traced at each checkpoint for router saturation
SEQ_LEN = 256  # tokens per traced sequence unless given (or the model's context is shorter)


def traced_seq_len(path: str | Path, seq_len: int | None) -> int:
    """The tokens per traced sequence of `analyze(path, seq_len=...)`, checked against the
    model's max_seq_len (read without its weights): None is SEQ_LEN, or max_seq_len where that
    is shorter; a seq_len above max_seq_len is refused."""
    max_seq_len = read_config(path).model.max_seq_len
    if seq_len is None:
        return min(SEQ_LEN, max_seq_len)
    if seq_len > max_seq_len:
        raise ValueError(
            f"seq_len={seq_len} is invalid: must be at most the model's max_seq_len "
            f"({max_seq_len}); give seq_len={max_seq_len} or less"
        )
    return seq_len


def analyze(
    path: str | Path, data: str | None = None, n_tokens: int = 16384,
    out_dir: str | Path | None = None, seq_len: int | None = None,
) -> Path:  # fmt: skip
    """Trace `path` (RUN_DIR or HF_DIR) over the validation split of `data` (default: the run's
    corpus, else the standard library); write `out_dir` (default PATH/analysis)/report.md.
    seq_len: tokens per traced sequence (`traced_seq_len`)."""
    path = Path(path)
    seq_len = traced_seq_len(path, seq_len)  # before the model is read
    loaded = load(path, dtype="float32")
    out_dir = Path(out_dir or path / "analysis")
    check_no_file_in_the_way(out_dir)  # before the routing is traced
    model, corpus = loaded.model, loaded.config.train.data
    source = data or corpus.source
    documents = load_corpus(source, corpus.val_fraction).val.documents
    tokens = label_tokens(loaded.tokenizer, documents, n_tokens)
    if len(tokens.token_ids) < n_tokens:  # the report says so too; say it where it is seen
        warnings.warn(
            f"the validation split of {source} holds {len(tokens.token_ids):,} tokens, fewer than "
            f"the {n_tokens:,} asked: all of them are traced",
            FewerTokens,
            stacklevel=2,
        )
    trace = record_routing(model, tokens, seq_len)
    layers = [layer_stats(trace, i, moe.cfg.n_experts, moe.cfg.top_k)
              for i, moe in enumerate(model.moe_layers())]  # fmt: skip
    first = model.moe_layers()[0].cfg
    meta = {"source": str(path), "data": f"{source} (validation split)", "seq_len": seq_len,
            "n_tokens": len(tokens.token_ids), "n_experts": first.n_experts,
            "top_k": first.top_k}  # fmt: skip
    saturation = _saturation(loaded.checkpoints, tokens, seq_len, trace.ids)
    return write_report(out_dir, layers, meta, saturation)


def _saturation(
    checkpoints: list[Path], tokens: LabelledTokens, seq_len: int, final_ids: list
) -> dict[str, Any] | None:
    """OLMoE router saturation of every checkpoint against the final one (the loaded weights)."""
    if len(checkpoints) < 2:
        return None
    n = min(SATURATION_TOKENS, len(final_ids[0]))
    final = [ids[:n] for ids in final_ids]
    short = LabelledTokens(
        tokens.token_ids[:n], tokens.token_class[:n], tokens.domain[:n], tokens.domains
    )
    steps, per_layer = [], [[] for _ in final]
    for ckpt in checkpoints:
        trace = record_routing(load(ckpt, dtype="float32").model, short, seq_len)
        steps.append(int(ckpt.name.split("-")[-1]))
        for i, ids in enumerate(trace.ids):
            per_layer[i].append(metrics.saturation(ids, final[i]))
    return {"steps": steps, "layers": per_layer, "n_tokens": n}
