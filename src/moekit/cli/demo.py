"""`moekit demo [--a.b=value ...] [--out DIR] [--prompt=TEXT] [--max_new_tokens=N]`: train the
`demo` MoE and its dense twin side by side, compare them, then sample from the MoE.

Its config is the `demo` run preset with the overrides, printed and saved by training in both runs
(OUT/moe/config.json, OUT/dense/config.json). The sample's --prompt and --max_new_tokens are
spelt as generate's settings; the sample, prompt first, goes into the reports."""

from __future__ import annotations

import argparse
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from moekit.cli.common import (
    Command,
    check_prompt_room,
    positive_int,
    print_config,
    resolve_config,
    stream_text,
)
from moekit.config import RunConfig
from moekit.data import prepare_data
from moekit.fileio import check_no_file_in_the_way
from moekit.loading import load
from moekit.model import format_count
from moekit.train import twin, write_report
from moekit.train.device import training_device
from moekit.train.twin import DENSE, MOE

DEMO_PRESET = "demo"
DEMO_PROMPT = "def main("  # no trailing space: byte-level BPE tokens carry their leading space


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="folder of both runs (replaced if a demo)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="text the sample continues")
    p.add_argument("--max_new_tokens", type=positive_int, default=200,
                   help="tokens the sample generates")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    cfg = resolve_config(RunConfig, DEMO_PRESET, args.overrides)
    training_device(cfg.train.device)  # before the previous demo is cleared
    out = Path(args.out)
    check_replaceable(out)
    check_prompt(cfg, args.prompt)  # before minutes of training, not after them
    clear_previous_demo(out)
    print_config(cfg)
    result = twin.train_with_dense_twin(cfg, out)
    loaded = load(out / MOE)
    print(f"\n--- sample (prompt {args.prompt!r}, temperature 0.8, top-k 50, top-p 0.95) ---")
    text = stream_text(loaded.model, loaded.tokenizer, args.prompt, args.max_new_tokens).text
    print("--- end of sample ---")
    sample = args.prompt + text
    write_report(out / MOE, cfg, loaded.model, sample=sample)  # its training wrote it without one
    report = twin.write_twin_report(result, cfg, sample)
    print_twin_figures(result, cfg, report, args.prompt, time.perf_counter() - start)


def print_twin_figures(result: Any, cfg: Any, report: Path, prompt: str, seconds: float) -> None:
    moe = cfg.model.moe
    shapes = {
        MOE: f"{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {moe.n_experts} experts "
        f"of {moe.d_expert} top-{moe.top_k}"
        + (f" + shared {moe.shared_width}" if moe.shared_width else ""),
        DENSE: f"the same with a dense FFN of {moe.active_width}",
    }
    print(f"\n=== an MoE and its dense twin, side by side ({report}) ===")
    for name, run in result.runs.items():
        print(
            f"{name:<6} {format_count(run['parameters'])} parameters, "
            f"{format_count(run['active_parameters'])} active ({shapes[name]}): validation "
            f"{run['final_val_loss']:.3f} nats/token, {run['final_val_bpb']:.3f} bits/byte, "
            f"{run['tokens_per_s']:,.0f} tokens/s"
        )
    cmp = result.comparison[MOE]
    reached = "MoE did not reach dense's final validation loss"
    if cmp["step_ratio"] is not None:
        steps, time_ = (twin.ratio_text(result, key) for key in ("step_ratio", "time_ratio"))
        reached = f"MoE reached dense's final validation loss in {steps} the steps and {time_} "
        reached += "the training time"
    print(f"{reached} (throughput {cmp['throughput_ratio']:.2f}x dense's; {result.steps} steps)")
    print("expert balance over the last quarter of training (share of the mean load):")
    print(twin.balance_table(result.balance))
    print(f"report      {report} (loss.png: both models; expert_load.png: the MoE's experts)")
    print(f"more text   moekit generate {result.moe_dir} --prompt={shlex.quote(prompt)}")
    minutes, rest = divmod(round(seconds), 60)
    print(f"demo time   {minutes} min {rest} s")


def check_prompt(cfg: RunConfig, prompt: str) -> None:
    """Refuse a prompt that leaves the sample no room in the model's context, with the run's
    tokenizer: the data is prepared here once (tokenizer and token splits cached: both runs then
    read them), as the runs would first thing."""
    tokenizer = prepare_data(cfg.train.data, cfg.token_vocab_size, progress=True).tokenizer
    check_prompt_room(tokenizer, prompt, cfg.model.max_seq_len, "--prompt")


def check_replaceable(out: Path) -> None:
    """Refuse an `out` that exists and is not an earlier demo (which the demo replaces), or that
    a file is in the way of."""
    check_no_file_in_the_way(out)
    if out.exists() and not all((out / name / "config.json").is_file() for name in (MOE, DENSE)):
        raise FileExistsError(
            f"{out} exists and is not a demo of an MoE and its dense twin (an older demo's single "
            "run, or a run of yours?): delete it yourself or choose another --out"
        )


def clear_previous_demo(out: Path) -> None:
    """Remove an earlier demo in `out`; refuse to delete anything else."""
    check_replaceable(out)
    if out.exists():
        shutil.rmtree(out)


COMMAND = Command("demo", f"train the `{DEMO_PRESET}` MoE and its dense twin side by side for a "
                  "few minutes, compare them, then sample from the MoE", configure, run,
                  overrides=True, preset=DEMO_PRESET, trains=True)  # fmt: skip
