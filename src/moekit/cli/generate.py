"""`moekit generate RUN_DIR [CONFIG.json] [--a.b=value ...]`: stream text from a trained run; its
resolved `GenerateConfig` goes to stderr, so stdout holds the text alone."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from moekit.cli.common import CONFIG_HELP, Command, print_config, resolve_config, stream_text
from moekit.config import GenerateConfig, OffloadConfig
from moekit.cpu_memory import use_huge_pages
from moekit.inference.budget import check_budget_form
from moekit.inference.offload import format_stats, load_offloaded
from moekit.inference.trace import load_trace
from moekit.loading import load
from moekit.train.checkpoint import checkpoint_remedy
from moekit.train.sample import find_run, read_run_tokenizer


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by moekit train")
    p.add_argument("config", nargs="?", metavar="CONFIG.json", help=CONFIG_HELP)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_config(GenerateConfig, args.config, args.overrides)
    if cfg.offload.budget is not None:
        check_budget_form(cfg.offload.budget)  # before anything is read
        model, tokenizer, offload = offloaded_run(args.run_dir, cfg.offload)
    else:
        loaded, offload = load(args.run_dir), None
        model, tokenizer = loaded.model, loaded.tokenizer
    print_config(cfg, sys.stderr)  # once the model loaded: a bad run is one line of error
    use_huge_pages(model.parameters())  # decode streams every weight per token (cpu_memory)
    sampling = {"temperature": cfg.temperature, "top_k": cfg.top_k or None, "top_p": cfg.top_p}
    stream_text(model, tokenizer, cfg.prompt, cfg.max_new_tokens, seed=cfg.seed, **sampling)
    if offload is not None:
        offload.close()
        print(format_stats(offload.stats()))
    return 0


def offloaded_run(run_dir: str, cfg: OffloadConfig) -> tuple[Any, Any, Any]:
    """The run's newest checkpoint with its routed experts left in the checkpoint file behind a
    cache (the whole model is never in memory), checked before generation starts."""
    run_cfg, checkpoint = find_run(run_dir)
    tokenizer = read_run_tokenizer(checkpoint.parent.parent)  # RUN/checkpoints/step-N -> RUN
    counts = load_trace(cfg.trace, run_cfg.model).expert_counts() if cfg.trace else None
    with warnings.catch_warnings(record=True) as notes:  # e.g. prefetch standing down
        warnings.simplefilter("always")
        model, offload = load_offloaded(
            checkpoint / "model.safetensors", run_cfg.model, remedy=checkpoint_remedy(checkpoint),
            budget=cfg.budget, policy=cfg.policy, prefetch=cfg.prefetch, expert_counts=counts,
        )  # fmt: skip
    for note in notes:
        print(f"note: {note.message}", file=sys.stderr)
    return model, tokenizer, offload


COMMAND = Command("generate", "stream text from a trained run's newest checkpoint", configure, run,
                  overrides=True, config=GenerateConfig)  # fmt: skip
