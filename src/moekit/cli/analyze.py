"""`moekit analyze RUN_DIR|HF_DIR [CONFIG.json] [--a.b=value ...] [--out DIR]`: trace a model's
routing over held-out text; write the report, and its resolved `AnalyzeConfig` as
analyze_config.json beside it (not config.json: --out may be a run or HF directory, whose
config.json is the model's)."""

from __future__ import annotations

import argparse

from moekit.analysis.analyze import FewerTokens, analyze, traced_seq_len
from moekit.cli.common import Command, print_config, resolve_config, warnings_as_notes
from moekit.config import AnalyzeConfig
from moekit.fileio import atomic_write_text, check_own_folder

CONFIG_FILE = "analyze_config.json"  # written by every analysis, beside its report


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="RUN_DIR|HF_DIR", help="a moekit run or a HF checkpoint dir")
    p.add_argument("--out", help="report folder (default: PATH/analysis)")


def run(args: argparse.Namespace) -> None:
    cfg = resolve_config(AnalyzeConfig, args.config, args.overrides)
    if args.out is not None:  # (the default, PATH/analysis, is the analysis' own)
        check_own_folder(args.out, (CONFIG_FILE,), "an analysis")
    cfg = cfg.replace(seq_len=traced_seq_len(args.path, cfg.seq_len))  # the number it traces
    print_config(cfg)
    with warnings_as_notes(FewerTokens):  # its own notes as notes
        report = analyze(args.path, cfg.data, cfg.tokens, args.out, cfg.seq_len)
    atomic_write_text(report.parent / CONFIG_FILE, cfg.to_json())
    print(f"report: {report}")


COMMAND = Command("analyze", "trace a model's routing over held-out text; write a report",
                  configure, run, overrides=True, config=AnalyzeConfig)  # fmt: skip
