"""`moekit analyze`: load a run directory or a Hugging Face checkpoint, trace its routing over
held-out text, and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from moekit.analysis.report import layer_stats, write_report
from moekit.analysis.trace import label_tokens, record_routing
from moekit.data import load_corpus
from moekit.model import MoETransformer

SATURATION_TOKENS = 4096  # tokens traced at each checkpoint for router saturation


def analyze(
    path: str | Path, data: str | None = None, n_tokens: int = 16384,
    out_dir: str | Path | None = None, seq_len: int | None = None,
) -> Path:  # fmt: skip
    """Trace `path` (RUN_DIR or HF_DIR) over the validation split of `data` (default: the run's
    corpus, else the standard library); write `out_dir` (default PATH/analysis)/report.md."""
    path = Path(path)
    model, tok, source, val_fraction, checkpoints = _load(path)
    source = data or source
    seq_len = min(seq_len or 256, model.cfg.max_seq_len)
    documents = load_corpus(source, val_fraction).val.documents
    tokens = label_tokens(tok, documents, n_tokens)
    trace = record_routing(model, tokens, seq_len)
    layers = [layer_stats(trace, i, moe.cfg.n_experts, moe.cfg.top_k)
              for i, moe in enumerate(model.moe_layers())]  # fmt: skip
    first = model.moe_layers()[0].cfg
    meta = {"source": str(path), "data": f"{source} (validation split)", "seq_len": seq_len,
            "n_tokens": len(tokens.token_ids), "n_experts": first.n_experts,
            "top_k": first.top_k}  # fmt: skip
    saturation = _saturation(model, checkpoints, tokens, seq_len, trace.ids)
    return write_report(Path(out_dir or path / "analysis"), layers, meta, saturation)


def _load(path: Path) -> tuple[MoETransformer, Tokenizer, str, float, list[Path]]:
    """Model, tokenizer, default corpus, validation fraction and checkpoints of a directory."""
    if (path / "checkpoints").is_dir():
        from moekit.train.checkpoint import list_checkpoints
        from moekit.train.sample import load_run

        cfg, model, tok = load_run(path)
        return (
            model,
            tok,
            cfg.train.data.source,
            cfg.train.data.val_fraction,
            list_checkpoints(path),
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is neither a run directory (checkpoints/) nor a Hugging Face checkpoint "
            "directory (config.json)"
        )
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer.json: analysis needs the tokenizer")
    from moekit.interop import load_hf
    from moekit.userfiles import REDOWNLOAD, read_tokenizer

    return (
        load_hf(path, "float32"),
        read_tokenizer(path / "tokenizer.json", REDOWNLOAD),
        "stdlib",
        0.05,
        [],
    )


def _saturation(
    model: MoETransformer, checkpoints: list[Path], tokens: Any, seq_len: int, final_ids: list
) -> dict[str, Any] | None:
    """OLMoE router saturation of every checkpoint against the final one (the loaded weights)."""
    if len(checkpoints) < 2:
        return None
    from moekit.analysis import metrics
    from moekit.train.checkpoint import load_weights

    n = min(SATURATION_TOKENS, len(final_ids[0]))
    final = [ids[:n] for ids in final_ids]
    short = type(tokens)(
        tokens.token_ids[:n], tokens.token_class[:n], tokens.domain[:n], tokens.domains
    )
    steps, per_layer = [], [[] for _ in final]
    for ckpt in checkpoints:
        load_weights(ckpt, model)
        trace = record_routing(model, short, seq_len)
        steps.append(int(ckpt.name.split("-")[-1]))
        for i, ids in enumerate(trace.ids):
            per_layer[i].append(metrics.saturation(ids, final[i]))
    return {"steps": steps, "layers": per_layer, "n_tokens": n}
