"""`moekit train [PRESET|CONFIG.json] [--a.b=value ...] [--out RUN_DIR] [--resume RUN_DIR]`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from moekit.cli.common import DEFAULT_PRESET, Command, print_config, resolve_config
from moekit.config import ModelConfig, RunConfig
from moekit.distributed.trainer import train_distributed
from moekit.model import MoETransformer
from moekit.overrides import apply_overrides, split_override, touches
from moekit.train import TrainResult, train
from moekit.train.device import training_device
from moekit.train.init_from import RESUME_MAY_CHANGE, describe_changes, model_changes
from moekit.train.report import loss_text
from moekit.train.run_dir import check_run_dir
from moekit.train.sample import read_run_config
from moekit.train.world import wants_processes


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help=f"preset or config JSON (default {DEFAULT_PRESET})")
    p.add_argument("--out", help="run directory (default runs/<preset>-<date>-<time>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last checkpoint")


def run(args: argparse.Namespace) -> None:
    if args.resume is not None:
        if args.config is not None or args.out is not None:
            raise ValueError("--resume RUN_DIR continues that run: give no config and no --out")
        run_dir = Path(args.resume)
        recorded = read_run_config(run_dir)
        # a resumed run reads its own tokenizer.json: tokenizer=run says what it does anyway
        same = ("train.data.tokenizer", "run")
        overrides = [o for o in args.overrides if split_override(o) != same]
        check_tokenizer_kept(run_dir, recorded, overrides)  # (before its rules between fields)
        cfg = apply_overrides(recorded, overrides)
        check_resume(run_dir, recorded, cfg, overrides)
    else:
        cfg = resolve_config(RunConfig, args.config, args.overrides)
        run_dir = Path(args.out or default_run_dir(args.config))
    training_device(cfg.train.device)  # before the config is printed and the run begins
    many = wants_processes(cfg)  # torchrun, or parallel.ep/dp
    talks = not many or os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 prints
    if talks:
        print_config(cfg)
    t = cfg.train
    if talks and t.warmup_steps > t.steps:
        print(f"note: train.warmup_steps={t.warmup_steps} outlasts the run (train.steps="
              f"{t.steps}): the learning rate never reaches train.lr={t.lr:g}",
              file=sys.stderr)  # fmt: skip
    trainer = train_distributed if many else train
    result = trainer(cfg, run_dir, resume=args.resume is not None)
    if talks:
        print_result(result)
    if result.interrupted:  # saved, but not trained to its end: exit 130, as an interrupt does
        raise KeyboardInterrupt


def check_resume(run_dir: Path, recorded: RunConfig, cfg: RunConfig, overrides: list[str]) -> None:
    """Refuse to resume `run_dir` (its config.json: `recorded`) as `cfg` (with the `overrides`)
    where that trains nothing or a model its checkpoint cannot be (other weights: more experts,
    an MTP module), before the run directory is touched. A change its weights still fit (the
    capacity, top_k) is the user's to make."""
    changes = model_changes(recorded.model, cfg.model, RESUME_MAY_CHANGE)
    if changes and _weight_shapes(recorded.model) != _weight_shapes(cfg.model):
        names = [name for name, _, _ in changes]
        items = [o for o in overrides if touches(split_override(o)[0], names)] or [
            o for o in overrides if o.startswith("--model.")
        ]
        one, given = len(items) == 1, " ".join(items)
        start = f"moekit train {run_dir / 'config.json'} {given}"
        if names == ["model.mtp_depth"]:  # an MTP module is added to the run's weights
            new = f"add the MTP module in a new run from its weights: {start} --train.init_from="
            new += str(run_dir)
        else:
            new = f"train a new model with {'it' if one else 'them'}: {start}"
        raise ValueError(
            f"{given} change{'s' if one else ''} the model of {run_dir}: "
            f"{describe_changes(changes, 'in the run')}; a resumed run keeps its model: drop "
            f"{'it' if one else 'them'}, or {new} --out NEW_RUN_DIR"
        )
    check_run_dir(run_dir, True, cfg.train.steps, recorded.train.steps)


TOKENIZER_SETTINGS = ("train.data.tokenizer", "train.data.vocab_size")


def check_tokenizer_kept(run_dir: Path, recorded: RunConfig, overrides: list[str]) -> None:
    """A resumed run reads its own tokenizer.json: an override that changes its
    train.data.tokenizer or vocab_size (or a setting holding them: --train.data={...}) is
    refused, naming it; one the config's rules refuse on the run's own data counts as a change
    (bytes for a BPE run of a vocab_size)."""
    data = recorded.train.data
    for item in overrides:
        if not touches(split_override(item)[0], TOKENIZER_SETTINGS):
            continue
        try:
            now = apply_overrides(recorded, [item]).train.data
        except ValueError:
            now = None
        if now is None or (now.tokenizer, now.vocab_size) != (data.tokenizer, data.vocab_size):
            raise ValueError(
                f"{item} changes the tokenizer of {run_dir} (tokenizer {data.tokenizer}, "
                f"vocab_size {data.vocab_size}): a resumed run keeps its tokenizer (its "
                "tokenizer.json); drop it"
            )


def _weight_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name and shape of each weight of a `model` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(t.shape) for k, t in MoETransformer(model).state_dict().items()}


def default_run_dir(spec: str | None) -> str:
    name = Path(spec).stem if spec and spec.endswith(".json") else (spec or DEFAULT_PRESET)
    return f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def print_result(result: TrainResult) -> None:
    if result.interrupted:
        print(f"\ninterrupted at step {result.step}; checkpoint {result.checkpoint}")
        print(f"continue with: moekit train --resume {result.run_dir}")
    print(
        f"\nstep {result.step}: train loss {loss_text(result.train_loss)}, "
        f"validation loss {loss_text(result.val_loss)} ({loss_text(result.val_bpb)} bits/byte), "
        f"{result.tokens_per_s:,.0f} tokens/s"
    )
    print(f"report: {result.run_dir / 'report.md'}")


COMMAND = Command("train", "train a model on the built-in corpus (or any text) and write a run "
                  "directory", configure, run, overrides=True, trains=True)  # fmt: skip
