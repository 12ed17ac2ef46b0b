"""`moekit quantize RUN_DIR|HF_DIR [CONFIG.json] [--weights=int4 --attention=int8 ...] --out DIR`:
weight-only quantization of a model's projections (`QuantizeConfig`), written as a run directory
that generate, analyze, offloading and `convert --to-hf` (dequantized) read.

A Hugging Face directory is read straight into its quantized form (`load_hf(quantize=...)`), one
tensor at a time: its float model is never in memory. GPT-OSS's MXFP4 experts with
`--experts=mxfp4` are taken as shipped (the checkpoint's bytes, rows reordered to moekit's
layout); in another scheme they are dequantized one expert at a time and requantized. DeepSeek-V3's
FP8 weights are dequantized one slice at a time and quantized (int8 is the closest scheme)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from moekit.cli.common import Command, print_config, resolve_config
from moekit.config import QuantizeConfig
from moekit.config.rules import invalid
from moekit.fileio import check_new_path
from moekit.interop.convert import hf_run_config
from moekit.interop.hf import load_hf
from moekit.loading import is_hf_directory, load, read_config
from moekit.model import MoETransformer
from moekit.quant.modules import PARTS, parts_of, quantize_model
from moekit.train.checkpoint import write_quantized_run
from moekit.userfiles import REDOWNLOAD, read_tokenizer


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("--out", required=True, help="the directory to write (a new run directory)")


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(QuantizeConfig, args.config, args.overrides)
    if cfg.zero_point and "int4" not in {cfg.scheme_of(part) for part in PARTS}:
        # (a checkpoint's quantization.json may say so: only its int4 parts ever took it)
        raise invalid(
            "zero_point",
            True,
            "applies to int4 weights only (q4_1's rule), and no part is int4 "
            "here: drop it, or choose int4 for a part (--weights=int4, --experts=int4)",
        )
    if all(cfg.scheme_of(part) is None for part in PARTS):
        raise ValueError(
            "every part is none: nothing would be quantized; choose a scheme for a part "
            "(--weights=int4, --experts=int8, ...), or write a quantized run's float weights "
            "with moekit convert --to-hf RUN_DIR --arch ARCH --out DIR"
        )
    check_new_path(args.out, "choose a new directory for the quantized model")  # before reading
    check_parts(cfg, args.path)
    print_config(cfg)
    source = Path(args.path)
    if is_hf_directory(source):
        if (source / "tokenizer.json").is_file():  # before the weights (minutes): it is copied
            read_tokenizer(source / "tokenizer.json", f"restore tokenizer.json ({REDOWNLOAD})")
        model = load_hf(source, quantize=cfg, progress=True)  # a HF directory, quantized as read
        config = hf_run_config(model.cfg)
        before = _float_bytes(model)
    else:
        loaded = load(source, require_tokenizer=False)
        before = _float_bytes(loaded.model)
        model = quantize_model(loaded.model, cfg)
        config = loaded.config
        source = loaded.folder  # the run directory
    tokenizer = source / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    out = write_quantized_run(Path(args.out), config, model, cfg, tokenizer)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"wrote {out}: weights {before / 1e6:,.1f} MB -> {after / 1e6:,.1f} MB")


PART_MISSING = {
    "experts": "has no routed experts (a dense model)",
    "ffn": "has no dense FFN layer or shared expert",
    "head": "ties its LM head to the embedding, which stays as it is",
}


def check_parts(cfg: QuantizeConfig, path: str) -> None:
    """A part given its own scheme that the model lacks is refused (it was ignored), from the
    model's config, before a weight is read."""
    present = parts_of(read_config(path).model)
    for part, missing in PART_MISSING.items():
        if getattr(cfg, part) is not None and part not in present:
            raise ValueError(
                f"--{part}={getattr(cfg, part)}: {path} {missing}, so it would be ignored: drop it"
            )


def _float_bytes(model: MoETransformer) -> int:
    """The bytes of `model`'s weights unquantized, in its float dtype (its embedding's)."""
    with torch.device("meta"):
        shapes = MoETransformer(model.cfg).state_dict().values()
    return sum(t.numel() for t in shapes) * model.embed.weight.element_size()


COMMAND = Command("quantize", "quantize a model's weights (int8, int4, MXFP4, bf16) for "
                  "inference", configure, run, overrides=True, config=QuantizeConfig)  # fmt: skip
