"""Prefill: how fast a prompt is read before the first new token, on a 30B-class quantized model.

A chat turn's prompt (a template, a system message, the conversation so far) is tens to hundreds
of tokens, read in one forward before the reply's first token. This times that forward as
`generate` makes it (a KV cache, the last position's logits where the tree's forward takes
`logits_to_keep`) on big_model.py's model with Qwen3-30B-A3B's shapes (int4 experts, int8 rest;
written once under --work), for prompts of --lengths tokens, in fresh processes alternating
between this tree and, with --before REV, the code of an earlier commit (checked out into a
temporary git worktree), --rounds times: the host's drift falls on both alike. Each process loads
the model, swaps the decode kernels in as `moekit generate` does, runs one untimed short forward
(its first call's set-up), then reports seconds, tokens/s and the last position's 8 best logits
per length. Both trees must agree on them (the same model and prompt; the int8-activation rows
may move a logit by ~1e-2): the same best token, or a best-two margin within the tolerance, at
least 4 of the 8 ids shared, and every shared logit within it; else the run fails. (With random
weights the last logits hardly depend on the prompt, so this guards against gross errors only;
the kernels' own tests hold their passes to lone calls bit for bit.)

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
import time
from pathlib import Path

import torch

from moekit.fileio import atomic_write_json, default_cache_dir
from moekit.machine import machine_info

try:  # a --before child runs this file on an older tree's moekit (its parent checked --out)
    from moekit.cli.common import results_file
except ImportError:
    results_file = Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # (this directory's modules: in main,
# the parent's; a child runs another tree's moekit, which they may not import)
RESULTS = Path(__file__).resolve().parent / "results" / "prefill.json"
MODEL = "qwen3-30b-a3b"
LOGIT_TOLERANCE = 0.05  # of the largest |logit|: how far the trees' last logits may differ


def prefill(run: str, lengths: list[int]) -> dict:
    """In this process (whichever moekit is importable): load, swap the decode kernels in, and
    time generate's prefill forward for a seeded random prompt of each length."""
    import inspect

    from moekit import load
    from moekit.cpu_memory import use_huge_pages
    from moekit.inference.decode_kernels import apply_decode_kernels
    from moekit.model.generation import KVCache

    model = apply_decode_kernels(load(run, require_tokenizer=False).model)
    use_huge_pages(model)
    takes_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    keep = {"logits_to_keep": 1} if takes_keep else {}  # as the tree's generate calls it
    g = torch.Generator().manual_seed(1)
    out = {}
    with torch.no_grad():
        warm = torch.zeros(1, 4, dtype=torch.long)  # untimed: the first call's set-up
        model(warm, kv_cache=KVCache.for_model(model, 1, 4), with_aux=False)
        for S in lengths:
            ids = torch.randint(0, model.cfg.vocab_size, (1, S), generator=g)
            cache = KVCache.for_model(model, 1, S)
            start = time.perf_counter()
            logits = model(ids, kv_cache=cache, with_aux=False, **keep).logits[0, -1]
            seconds = time.perf_counter() - start
            top = logits.topk(8)
            out[str(S)] = {
                "seconds": seconds,
                "tokens_per_s": S / seconds,
                "top_ids": top.indices.tolist(),
                "top_logits": top.values.tolist(),
            }
    return out


def logits_agree(a: dict, b: dict) -> bool:
    """Whether two runs' last logits (`prefill`'s top 8) agree within LOGIT_TOLERANCE."""
    tol = LOGIT_TOLERANCE * max(abs(v) for v in a["top_logits"] + b["top_logits"])
    va = dict(zip(a["top_ids"], a["top_logits"], strict=True))
    vb = dict(zip(b["top_ids"], b["top_logits"], strict=True))
    shared = va.keys() & vb.keys()
    same_best = (
        a["top_ids"][0] == b["top_ids"][0]
        or min(a["top_logits"][0] - a["top_logits"][1], b["top_logits"][0] - b["top_logits"][1])
        <= tol
    )
    return same_best and len(shared) >= 4 and all(abs(va[i] - vb[i]) <= tol for i in shared)


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
    p.add_argument("--out", type=results_file, default=RESULTS)
    p.add_argument("--child", help=argparse.SUPPRESS)  # the child process: time this run
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.child:
        result = prefill(args.child, args.lengths)
        print(json.dumps(result))
        return result
    if min(args.lengths) < 1 or args.rounds < 1:
        p.error("--lengths and --rounds must be >= 1")
    from big_model import write_model
    from kernel_ab import provenance, runs_by_tree

    run, write_s = write_model(MODEL, args.quick, args.work)
    code = provenance()  # (the code as the runs import it, not as it may be after them)
    runs = runs_by_tree(
        args.before, args.rounds, "prefill-before-",
        lambda src: in_fresh_process(src, run, args.lengths),
    )  # fmt: skip
    every = [r for v in runs.values() for r in v]
    agree = all(logits_agree(every[0][str(S)], r[str(S)]) for r in every for S in args.lengths)
    result = {
        "benchmark": "prefill",
        "machine": machine_info(),
        "settings": {k: str(v) for k, v in vars(args).items()} | {"model": MODEL},
        **code,
        "write_s": write_s,
        "runs": runs,
        "median_tokens_per_s": {name: summary(v, args.lengths) for name, v in runs.items()},
        "logits_agree": agree,
        "logit_tolerance": LOGIT_TOLERANCE,
    }
    if args.before:
        before, after = result["median_tokens_per_s"].values()
        result["speedup"] = {S: after[S] / before[S] for S in after}
    atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    if not agree:
        raise SystemExit("prefill.py: the runs' last logits disagree (see `runs` in the results)")
    return result


if __name__ == "__main__":
    main()
