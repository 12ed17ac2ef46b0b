"""`moekit quantize RUN_DIR|HF_DIR [CONFIG.json] [--weights=int4 --attention=int8 ...] --out DIR`:
weight-only quantization of a model's projections (`QuantizeConfig`), written as a run directory
that generate, analyze, offloading and `convert --to-hf` (dequantized) read."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.cli.common import CONFIG_HELP, Command, print_config, resolve_config
from moekit.config import QuantizeConfig
from moekit.loading import load
from moekit.quant.modules import quantize_model
from moekit.train.checkpoint import write_quantized_run


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("config", nargs="?", metavar="CONFIG.json", help=CONFIG_HELP)
    p.add_argument("--out", required=True, help="the directory to write (a new run directory)")


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(QuantizeConfig, args.config, args.overrides)
    print_config(cfg)
    if Path(args.out).exists():  # before the model is read
        raise FileExistsError(f"{args.out} exists; choose a new directory for the quantized model")
    loaded = load(args.path, require_tokenizer=False)
    before = sum(t.numel() * t.element_size() for t in loaded.model.state_dict().values())
    model = quantize_model(loaded.model, cfg)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    source = loaded.checkpoints[-1].parent.parent if loaded.checkpoints else Path(args.path)
    tokenizer = source / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    out = write_quantized_run(Path(args.out), loaded.config, model, cfg, tokenizer)
    print(f"wrote {out}: weights {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB")
    return 0


COMMAND = Command("quantize", "quantize a model's weights (int8, int4, MXFP4, bf16) for "
                  "inference", configure, run, overrides=True, config=QuantizeConfig)  # fmt: skip
