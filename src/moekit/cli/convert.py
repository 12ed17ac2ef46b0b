"""`moekit convert --from-hf DIR --out RUN_DIR`, `moekit convert --to-hf RUN_DIR --arch ARCH --out
DIR`: Hugging Face checkpoints to run directories and back."""

from __future__ import annotations

import argparse

from moekit.cli.common import Command, number
from moekit.interop import save_hf
from moekit.interop.archs import ARCHITECTURES
from moekit.interop.convert import hf_to_run
from moekit.interop.files import WEIGHT_DTYPES, parse_size
from moekit.interop.keymaps import LAYOUTS
from moekit.loading import load
from moekit.quant.modules import dequantize_model

byte_size = number(parse_size, lambda v: v >= 1,
                   "a size above 0 in bytes or with a unit (5GB, 500MB, 2GiB)")  # fmt: skip


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
    p.add_argument("--layout", choices=LAYOUTS, default="per_expert", help="expert key layout")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="of the weights")
    p.add_argument("--max-shard-size", type=byte_size, default="2GB", help="bytes per shard")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (--to-hf)")


def run(args: argparse.Namespace) -> int:
    if args.from_hf:
        out = hf_to_run(args.from_hf, args.out, dtype=args.dtype)
        print(f"wrote run directory {out} (weights as checkpoint step 0)")
        return 0
    if args.arch is None:
        raise ValueError("--to-hf needs --arch (one of the architectures in `moekit convert -h`)")
    loaded = load(args.to_hf, require_tokenizer=False)  # its tokenizer is copied where it has one
    model = dequantize_model(loaded.model)  # a quantized run's weights, dequantized (float32)
    out = save_hf(model, args.out, args.arch, tokenizer=loaded.tokenizer,
                  layout=args.layout, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  overwrite=args.overwrite)  # fmt: skip
    print(f"wrote {args.arch} checkpoint {out}")
    return 0


COMMAND = Command("convert", "convert Hugging Face checkpoints to run directories (--from-hf) and "
                  "back (--to-hf)", configure, run)  # fmt: skip
