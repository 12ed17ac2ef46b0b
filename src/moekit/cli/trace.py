"""`moekit trace RUN_DIR|HF_DIR [CONFIG.json] [--max_new_tokens=32] --prompts FILE --out TRACE`:
record which experts each token uses while generating greedily; write the trace, and its
resolved `TraceConfig` beside it as TRACE.config.json. An existing TRACE is not replaced, and a
prompt that fills the model's context (max_seq_len) is refused, before the model is read."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from moekit.cli.common import Command, check_prompt_room, print_config, resolve_config
from moekit.config import TraceConfig
from moekit.fileio import atomic_write_text, check_new_path
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.inference.trace import record_prompts, save_trace
from moekit.loading import load, read_config, read_model_tokenizer
from moekit.userfiles import read_text


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="trace file to write (safetensors)")


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(TraceConfig, args.config, args.overrides)
    print_config(cfg)
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):  # before the model is read
        raise FileExistsError(f"--out {args.out} is a directory; give the trace a file name, such "
                              f"as {out / 'routing.trace'}")  # fmt: skip
    check_new_path(out, "choose a new --out for the trace, or remove the old one first")
    settings = Path(f"{out}.config.json")  # an existing output refused, as train and convert do
    if settings.exists():
        raise FileExistsError(f"{settings} exists (the settings of an earlier trace at {out}); "
                              "choose a new --out for the trace, or remove it first")  # fmt: skip
    text = read_text(args.prompts, "give a UTF-8 text file, one prompt per line")
    prompts = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not prompts:
        raise ValueError(f"{args.prompts} has no prompts (one per non-empty line)")
    max_seq_len = read_config(args.path).model.max_seq_len  # the prompts checked before the model
    tokenizer = read_model_tokenizer(args.path)
    for n, line in prompts:
        what = f"the prompt on line {n} of {args.prompts}"
        check_prompt_room(tokenizer, line, max_seq_len, what)
    loaded = load(args.path)
    model = apply_decode_kernels(loaded.model)
    trace = record_prompts(model, loaded.tokenizer, [line for _, line in prompts],
                           cfg.max_new_tokens)  # fmt: skip
    save_trace(trace, out)
    atomic_write_text(settings, cfg.to_json())
    print(f"trace of {len(trace.ids)} tokens, {len(trace.requests())} requests: {out}")


COMMAND = Command("trace", "record which experts each token uses while generating", configure, run,
                  overrides=True, config=TraceConfig)  # fmt: skip
