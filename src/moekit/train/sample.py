"""A trained run: read its config, newest (or a given) checkpoint and tokenizer; sample text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from moekit.config import RUN_FILE_REMEDY, RunConfig
from moekit.data import eos_id
from moekit.model import MoETransformer, generate
from moekit.quant.files import empty_quantized_model, read_quantization
from moekit.train.checkpoint import CHECKPOINT_DIR, latest_checkpoint, load_weights
from moekit.userfiles import read_tokenizer


def find_run(path: str | Path) -> tuple[RunConfig, Path]:
    """The config and the checkpoint directory of a run directory written by `moekit train` (its
    newest checkpoint) or of one of its checkpoint directories (checkpoints/step-NNNNNN)."""
    path = Path(path)
    run_dir = path.parent.parent if path.parent.name == CHECKPOINT_DIR else path
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.json")
    cfg = RunConfig.from_file(run_dir / "config.json", RUN_FILE_REMEDY)
    checkpoint = latest_checkpoint(run_dir) if path == run_dir else path
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/step-*)")
    return cfg, checkpoint


def load_run(path: str | Path) -> tuple[RunConfig, MoETransformer, Path]:
    """The config, the model with the checkpoint's weights (eval mode) and that checkpoint's
    directory, of a run directory or one of its checkpoints (`find_run`); a quantized checkpoint
    (`moekit quantize`) gives the quantized model. `moekit.load` reads runs through this, and
    adds the tokenizer."""
    cfg, checkpoint = find_run(path)
    quantization = read_quantization(checkpoint)
    if quantization is None:
        model = MoETransformer(cfg.model)
    else:  # allocated quantized: the float model is never built
        model = empty_quantized_model(cfg.model, quantization)
    load_weights(checkpoint, model)
    return cfg, model.eval(), checkpoint


def read_run_tokenizer(run_dir: str | Path) -> Tokenizer:
    """The tokenizer.json of a run directory."""
    remedy = (
        "copy the run again, or only its tokenizer.json: from the checkpoint it was converted "
        f"from, or (a run moekit trained) `moekit train --resume {run_dir}` writes it again"
    )
    return read_tokenizer(Path(run_dir) / "tokenizer.json", remedy)


def sample_text(
    model: MoETransformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    **speculative: Any,
) -> str:
    """Continue `prompt` by up to `max_new_tokens` tokens (fewer at end-of-text or max_seq_len);
    returns the new text, and passes each new piece of it to `on_text` as it is made.
    `speculative`: generate's speculative, draft_tokens and stats."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    eos = eos_id(tokenizer)
    ids = tokenizer.encode(prompt).ids or [eos]  # an empty prompt starts a new document
    budget = min(max_new_tokens, model.cfg.max_seq_len - len(ids))
    if budget < 1:
        raise ValueError(
            f"the prompt is {len(ids)} tokens; the model's max_seq_len={model.cfg.max_seq_len} "
            "leaves no room to generate"
        )
    stream = _TextStream(tokenizer, on_text)
    generate(
        model,
        torch.tensor([ids]),
        budget,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos,
        generator=torch.Generator().manual_seed(seed),
        stream=stream,
        **speculative,
    )
    return stream.text


class _TextStream:
    """Turns new token ids into new text. Decoding the whole continuation each time keeps
    multi-byte characters whole: text ending in an incomplete character waits for the next token."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[str], None] | None) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.text = ""

    def __call__(self, ids_B: torch.Tensor) -> None:
        self.ids.append(int(ids_B[0]))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or len(text) <= len(self.text):
            return
        new, self.text = text[len(self.text) :], text
        if self.on_text is not None:
            self.on_text(new)
