"""The quantized decode kernels of an earlier commit against this tree's, side by side.

A change to `moekit/quant/kernels.c` or the bodies it includes is measured against the code before
it in one process: both sources are built (the earlier one taken from git, `--before REV`), both
libraries loaded, and every product timed with consecutive calls going to the two builds in turn
(`prefetch.measure`), so that the host's drift falls on both alike; each product's outputs are
first checked equal, bit for bit (a change that should not alter any sum). Two pools: `cache`, two
copies of each weight, which stay in cache where they fit, and `dram`, distinct copies of 1 GiB.

Shapes: Qwen3-30B-A3B's expert and attention products and decode.py's 213M model's LM head, one row
of x (a batch-1 decode step), 2 threads, bf16 / int8 / int4 / MXFP4 on their default paths.

    python benchmarks/kernel_ab.py --before 8e00a65        # ~3 minutes
    python benchmarks/kernel_ab.py --before HEAD~1 --body avx2   # each build a library of its own

Prints JSON; writes benchmarks/results/kernel_ab.json (or --out). Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefetch import (
    DEFAULT,
    POOL_BYTES,
    QUICK_SHAPES,
    ROUNDS,
    SCHEMES,
    add_common_arguments,
    build,
    check_body,
    geomean,
    measure,
    report_head,
    write_report,
)
from prefetch import SHAPES as PREFETCH_SHAPES

SHAPES = {**PREFETCH_SHAPES, "213M lm_head": (32000, 768)}
BEFORE = "before"
CACHE_ROUNDS = 400  # passes over the cache pool's two copies: 400 calls a build
KERNELS_DIR = "src/moekit/quant"


def git(*args: str) -> str:
    """git's output in this repository; SystemExit naming the command if it fails."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def provenance() -> dict:
    """Which code a result came from: HEAD's commit, and whether src/ had changed since."""
    return {
        "commit": git("rev-parse", "HEAD").strip(),
        "tree_changed_since": bool(git("status", "--porcelain", "--", "src").strip()),
    }


def runs_by_tree(before: str | None, rounds: int, prefix: str, run) -> dict[str, list]:
    """`run(src)` on this tree's src/ and, given `before`, on that commit's (checked out into a
    temporary git worktree named `prefix`..., removed after), the trees alternating `rounds` times
    in ABBA order (the host's drift and a round's first place fall on both alike): {tree's name:
    each round's result}, the earlier first.
    prefill.py's, shared_experts.py's and big_model.py's fresh processes, each importing its
    tree's moekit."""
    trees = {"this tree": Path(__file__).resolve().parent.parent / "src"}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        if before:
            commit = git("rev-parse", "--verify", f"{before}^{{commit}}").strip()
            git("worktree", "add", "--detach", tmp + "/tree", commit)
            trees = {f"before ({commit[:10]})": Path(tmp) / "tree" / "src", **trees}
        try:
            runs: dict[str, list] = {name: [] for name in trees}
            for i in range(rounds):
                for name, src in list(trees.items())[:: -1 if i % 2 else 1]:
                    runs[name].append(run(src))
        finally:
            if before:
                git("worktree", "remove", "--force", tmp + "/tree")
    return runs


def sources_at(rev: str, dest: Path) -> Path:
    """kernels.c and the files beside it (the bodies it includes) as they were at `rev`, written
    into `dest`; the path of that kernels.c."""
    for name in git("ls-tree", "--name-only", f"{rev}:{KERNELS_DIR}").split():
        if name.endswith((".c", ".h")):
            (dest / name).write_text(git("show", f"{rev}:{KERNELS_DIR}/{name}"))
    return dest / "kernels.c"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit whose kernels to compare")
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_body(parser, args.body)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    before_commit = git("rev-parse", "--verify", f"{args.before}^{{commit}}").strip()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            before = build(BEFORE, None, args.body, sources_at(before_commit, Path(tmp)))
        except ValueError as err:  # it does not compile, predates the API, lacks the body
            raise SystemExit(f"kernel_ab.py: the kernels of {args.before}: {err}") from None
    libraries = {DEFAULT: build(DEFAULT, None, args.body), BEFORE: before}
    # (pool bytes, passes over it): the cache pool's two copies, passed over many more times
    pools = {"cache": (0, CACHE_ROUNDS), "dram": (POOL_BYTES, ROUNDS)}
    if args.quick:
        pools = {"cache": (0, 4), "dram": (8 * 2**20, 2)}
    rows = []
    for pool, (pool_bytes, rounds) in pools.items():
        for scheme in SCHEMES:
            for label, (O, I) in (QUICK_SHAPES if args.quick else SHAPES).items():
                row = measure(libraries, scheme, O, I, pool_bytes, rounds)
                row |= {"pool": pool, "shape": label}
                row["speedup"] = row["us"][BEFORE] / row["us"][DEFAULT]
                rows.append(row)
    summary = {}  # per pool and scheme: the speedups' range and geometric mean over the shapes
    for pool in pools:
        for scheme in SCHEMES:
            ups = [r["speedup"] for r in rows if r["pool"] == pool and r["scheme"] == scheme]
            summary[f"{pool} | {scheme}"] = {
                "min": round(min(ups), 3),
                "max": round(max(ups), 3),
                "geomean": round(geomean(ups), 3),
            }
    for row in rows:
        row["speedup"] = round(row["speedup"], 3)
    report = {
        **report_head("kernel_ab", args, libraries[DEFAULT]),
        "before": {"rev": args.before, "commit": before_commit, "kernel_body": before.body},
        "this_tree": {
            "commit": git("rev-parse", "HEAD").strip(),
            "kernels_changed_since": bool(git("status", "--porcelain", "--", KERNELS_DIR).strip()),
        },
        "pools": {name: {"bytes": b, "passes": n} for name, (b, n) in pools.items()},
        "method": (
            "both builds loaded in one process; one product a call from Python through ctypes, "
            "1 row; consecutive calls alternate between the builds; medians of each build's "
            "calls; outputs checked equal first; speedup = before's time / this tree's"
        ),
        "summary": summary,
        "results": rows,
    }
    return write_report("kernel_ab", args, report)


if __name__ == "__main__":
    main()
