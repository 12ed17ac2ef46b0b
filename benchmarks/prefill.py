"""Prefill: how fast a prompt is read before the first new token, on a 30B-class quantized model.

A chat turn's prompt (a template, a system message, the conversation so far) is tens to hundreds
of tokens, read in one forward before the reply's first token. This times `generate(model, ids,
1)` (that forward, whose logits are the last position's, and the first token) on big_model.py's
model with Qwen3-30B-A3B's shapes (int4 experts, int8 rest; written once under --work), for
prompts of --lengths tokens, in fresh processes alternating between this tree and, with --before
REV, the code of an earlier commit (checked out into a temporary git worktree), --rounds times:
the host's drift falls on both alike. Each process loads the model, swaps the decode kernels in
as `moekit generate` does and reports seconds, tokens/s and the first token per length; the
first tokens of both trees must agree (the same model, the same prompt).

    python benchmarks/prefill.py --before 00fa8fb      # -> results/prefill.json
    python benchmarks/prefill.py --quick --lengths 4 20 --rounds 1   # scaled-down shapes (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_model import write_model
from kernel_ab import git
from moekit.fileio import atomic_write_json, default_cache_dir
from moekit.machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results" / "prefill.json"
REPO = Path(__file__).resolve().parent.parent
MODEL = "qwen3-30b-a3b"


def prefill(run: str, lengths: list[int]) -> dict:
    """In this process (whichever moekit is importable): load, swap the decode kernels in, and
    time generate's prefill and first token for a seeded random prompt of each length."""
    from moekit import load
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.model.generation import generate

    model = apply_decode_kernels(load(run, require_tokenizer=False).model)
    use_huge_pages(model)
    g = torch.Generator().manual_seed(1)
    out = {}
    for S in lengths:
        ids = torch.randint(0, model.cfg.vocab_size, (1, S), generator=g)
        start = time.perf_counter()
        first = generate(model, ids, 1)
        seconds = time.perf_counter() - start
        out[str(S)] = {"seconds": seconds, "tokens_per_s": S / seconds, "first": int(first[0, 0])}
    return out


def in_fresh_process(src: Path, run: Path, lengths: list[int]) -> dict:
    """`prefill` in a new process importing moekit from `src`."""
    command = [sys.executable, __file__, "--child", str(run), "--lengths", *map(str, lengths)]
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"prefill.py: the run on {src} failed:\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def summary(rounds: list[dict], lengths: list[int]) -> dict:
    return {str(S): statistics.median(r[str(S)]["tokens_per_s"] for r in rounds) for S in lengths}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="an earlier commit to time beside this tree")
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="big_model.py's scaled-down shapes")
    p.add_argument("--work", type=Path, default=default_cache_dir() / "big_model")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # the child process: time this run
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        result = prefill(args.child, args.lengths)
        print(json.dumps(result))
        return result
    if min(args.lengths) < 1 or args.rounds < 1:
        p.error("--lengths and --rounds must be >= 1")
    run, write_s = write_model(MODEL, args.quick, args.work)
    trees = {"this tree": REPO / "src"}
    with tempfile.TemporaryDirectory(prefix="prefill-before-") as tmp:
        if args.before:
            commit = git("rev-parse", "--verify", f"{args.before}^{{commit}}").strip()
            git("worktree", "add", "--detach", tmp + "/tree", commit)
            trees = {f"before ({commit[:10]})": Path(tmp) / "tree" / "src", **trees}
        try:
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for _ in range(args.rounds):
                for name, src in trees.items():
                    runs[name].append(in_fresh_process(src, run, args.lengths))
        finally:
            if args.before:
                git("worktree", "remove", "--force", tmp + "/tree")
    firsts = {json.dumps([r[str(S)]["first"] for S in args.lengths]) for v in runs.values()
              for r in v}  # fmt: skip
    result = {
        "benchmark": "prefill",
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()} | {"model": MODEL},
        "commit": git("rev-parse", "HEAD").strip(),
        "tree_changed_since": bool(git("status", "--porcelain", "--", "src").strip()),
        "write_s": write_s,
        "runs": runs,
        "median_tokens_per_s": {name: summary(v, args.lengths) for name, v in runs.items()},
        "same_first_tokens": len(firsts) == 1,
    }
    if args.before:
        before, after = result["median_tokens_per_s"].values()
        result["speedup"] = {S: after[S] / before[S] for S in after}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
