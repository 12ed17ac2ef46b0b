"""`moekit convert --from-hf DIR [CONFIG.json] [--dtype=bfloat16] --out RUN_DIR`,
`moekit convert --to-hf RUN_DIR --arch ARCH [CONFIG.json] [--layout=fused --dtype=bfloat16
--max_shard_size=2GB] --out DIR [--overwrite]`: Hugging Face checkpoints to run directories and
back. What is converted into what are arguments; how it is written is a `ConvertConfig`, saved in
the directory written as convert_config.json (not config.json: that is the model's)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moekit.cli.common import Command, print_config, resolve_config
from moekit.config import ConvertConfig
from moekit.config.rules import invalid
from moekit.fileio import atomic_write_text
from moekit.interop import save_hf
from moekit.interop.archs import ARCHITECTURES
from moekit.interop.convert import hf_to_run
from moekit.interop.files import parse_size
from moekit.interop.hf import check_hf_out
from moekit.loading import load
from moekit.overrides import split_override
from moekit.quant.files import is_quantized
from moekit.quant.modules import dequantize_model

CONFIG_FILE = "convert_config.json"


def configure(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint -> run directory")
    source.add_argument(
        "--to-hf", metavar="RUN_DIR", help="run's newest checkpoint -> Hugging Face"
    )
    p.add_argument(
        "--out", required=True, help="the run directory or checkpoint directory to write"
    )
    p.add_argument("--arch", choices=ARCHITECTURES, help="architecture to write (with --to-hf)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (--to-hf)")


def shard_bytes(cfg: ConvertConfig) -> int:
    """`max_shard_size` in bytes; one line naming it unless it is a size above 0."""
    try:
        size = parse_size(cfg.max_shard_size)
    except ValueError:
        size = 0
    if size < 1:
        rule = "must be a size above 0 in bytes or with a unit (5GB, 500MB, 2GiB)"
        raise invalid("max_shard_size", cfg.max_shard_size, rule)
    return size


def check_direction(args: argparse.Namespace) -> None:
    """What one direction needs, and nothing it would ignore: --to-hf takes --arch and may
    --overwrite a non-empty --out; --from-hf writes a new run directory in its own layout."""
    if args.to_hf:
        if args.arch is None:
            raise ValueError(
                "--to-hf needs --arch (one of the architectures in `moekit convert -h`)"
            )
        source, out = Path(args.to_hf).resolve(), Path(args.out).resolve()
        if out == source or out in source.parents or source in out.parents:
            where = "is" if out == source else "holds" if out in source.parents else "is inside"
            raise ValueError(
                f"--out {args.out} {where} the run being converted ({args.to_hf}): writing the "
                "checkpoint there would replace or mix into it; choose a folder outside it"
            )
        check_hf_out(args.out, args.overwrite, "--overwrite")
        return
    # what the command line says for --to-hf alone (a config file's, convert_config.json say,
    # holds both directions' settings: --from-hf reads its dtype)
    given = {split_override(item)[0] for item in args.overrides}
    ignored = [f"--{name}" for name in ("layout", "max_shard_size") if name in given]
    ignored += [name for name, value in (("--arch", args.arch), ("--overwrite", args.overwrite))
                if value]  # fmt: skip
    if ignored:
        one = len(ignored) == 1
        raise ValueError(
            f"{', '.join(ignored)} {'applies' if one else 'apply'} to --to-hf only: --from-hf "
            f"writes a new run directory (its checkpoint in moekit's own layout); drop "
            f"{'it' if one else 'them'}"
        )


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(ConvertConfig, args.config, args.overrides)
    max_shard_size = shard_bytes(cfg)  # before anything is read
    check_direction(args)
    print_config(cfg)
    if args.from_hf:
        out = hf_to_run(args.from_hf, args.out, dtype=cfg.dtype)
        atomic_write_text(Path(out) / CONFIG_FILE, cfg.to_json())
        print(f"wrote run directory {out} (weights as checkpoint step 0)")
        if not (Path(args.from_hf) / "tokenizer.json").is_file():
            print(
                f"note: {args.from_hf} has no tokenizer.json, so {out} has none: `moekit "
                f"generate` needs one (copy the model's tokenizer.json into {out})",
                file=sys.stderr,
            )
        return
    loaded = load(args.to_hf, require_tokenizer=False)  # its tokenizer is copied where it has one
    dtype = cfg.dtype or "float32"
    if is_quantized(loaded.model):  # said: the checkpoint is several times the run's size
        print(f"note: {args.to_hf} is quantized; Hugging Face checkpoints hold float weights, so "
              f"its weights are written dequantized, in {dtype} (--dtype=bfloat16 halves "
              "float32's size)", file=sys.stderr)  # fmt: skip
    # a quantized run's weights dequantized straight to the dtype written (float32 by default):
    # the float32 model is never built for a bfloat16 checkpoint
    model = dequantize_model(loaded.model, getattr(torch, dtype))
    out = save_hf(model, args.out, args.arch, tokenizer=loaded.tokenizer,
                  layout=cfg.layout, dtype=cfg.dtype, max_shard_size=max_shard_size,
                  overwrite=args.overwrite, chat_files=loaded.folder)  # fmt: skip
    atomic_write_text(Path(out) / CONFIG_FILE, cfg.to_json())
    print(f"wrote {args.arch} checkpoint {out}")


COMMAND = Command("convert", "convert Hugging Face checkpoints to run directories (--from-hf) and "
                  "back (--to-hf)", configure, run, overrides=True,
                  config=ConvertConfig)  # fmt: skip
