"""Rows of x up to which the quantized kernels (passes of 16 rows, each reading the weights) beat
the reference, dequantizing the weight to float32 for one `F.linear` (a GEMM): what
`moekit.quant.kernels.KERNEL_ROWS` is set from, for a prompt's rows (benchmarks/README.md,
Prefill).

For each scheme (its default activations, the body this CPU runs) and weight shape (Qwen3-30B-A3B's
attention and expert matrices, small and large), and each row count, the two are timed
alternately, medians of --repeats, 2 threads; `ratio` is the reference's time over the kernel's.
`recommended`: per scheme, the largest row count up to which every weight's ratio stays at or
above 1 (16, a single pass, if none).

    python benchmarks/kernel_rows.py                 # -> results/kernel_rows.json
    python benchmarks/kernel_rows.py --body portable --out ...   # the portable body's
    python benchmarks/kernel_rows.py --activations float --out ... # 4-bit weights on float x
    python benchmarks/kernel_rows.py --quick         # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import git
from moekit.cli.common import results_file
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info
from moekit.quant import kernels
from moekit.quant.schemes import quantize
from prefetch import check_body

RESULTS = Path(__file__).resolve().parent / "results" / "kernel_rows.json"
SHAPES = {  # (O, I): Qwen3-30B-A3B's
    "attention q (4096, 2048)": (4096, 2048),
    "attention o (2048, 4096)": (2048, 4096),
    "attention k/v (512, 2048)": (512, 2048),
    "expert gate+up (1536, 2048)": (1536, 2048),
    "expert down (2048, 768)": (2048, 768),
}
ROWS = (17, 24, 32, 48, 64, 96, 128, 192, 256)
SCHEMES = ("bf16", "int8", "int4", "mxfp4")


def ratio(qw, x: torch.Tensor, repeats: int) -> dict:
    """Reference and kernel times (ms, medians, alternating) on x, and their ratio."""

    def reference():
        return F.linear(x, qw.dequantize(torch.float32))

    def kernel():
        return kernels._linear_cpu(x, qw.scheme, qw.data, qw.scales, qw.offsets, None)

    times: dict[str, list[float]] = {"reference": [], "kernel": []}
    for fn in (reference, kernel):  # warm
        fn()
    for _ in range(repeats):
        for name, fn in (("reference", reference), ("kernel", kernel)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    return {**ms, "ratio": ms["reference"] / ms["kernel"]}


def recommended(table: dict, shapes: list[str], rows: tuple[int, ...]) -> int:
    """The largest row count up to which every one of `shapes` keeps a ratio >= 1 (16 if none)."""
    best = kernels.MAX_ROWS
    for R in rows:
        if all(table[s][str(R)]["ratio"] >= 1.0 for s in shapes):
            best = R
        else:
            break
    return best


def sweep(shapes: dict, rows: tuple[int, ...], repeats: int) -> dict:
    """Per scheme: the ratio table over `shapes` and `rows`, and its recommendation."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for scheme in SCHEMES:
        table: dict = {}
        for name, (O, I) in shapes.items():
            qw = quantize(torch.randn(O, I, generator=g) / I**0.5, scheme)
            table[name] = {str(R): ratio(qw, torch.randn(R, I, generator=g), repeats)
                           for R in rows}  # fmt: skip
        out[scheme] = {"table": table, "recommended": recommended(table, list(shapes), rows)}
        print(scheme, "recommended", out[scheme]["recommended"], "in use",
              kernels.kernel_rows(scheme))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small shapes, two row counts (tests)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--body", choices=kernels.PATHS, help="the kernels' body (default: the widest)")
    p.add_argument("--activations", choices=kernels.ACTIVATIONS, help="x for every scheme")
    p.add_argument("--out", type=results_file, default=RESULTS)
    args = p.parse_args(argv)
    if not kernels.available():
        raise SystemExit("kernel_rows.py: the quantized kernels are not built here (no compiler)")
    check_body(p, args.body)
    torch.set_num_threads(2)
    quick_shapes = {"small (64, 64)": (64, 64), "large (1024, 2048)": (1024, 2048)}
    shapes = quick_shapes if args.quick else SHAPES
    rows = (17, 40) if args.quick else ROWS
    with contextlib.ExitStack() as settings:
        if args.body:
            settings.enter_context(kernels.use_path(args.body))
        if args.activations:
            settings.enter_context(kernels.use_activations(args.activations))
        result = {"machine": machine_info(), "commit": git("rev-parse", "HEAD").strip(),
                  "body": kernels.path(), "repeats": args.repeats,
                  "activations": kernels.activations(), "rows": list(rows),
                  "schemes": sweep(shapes, rows, args.repeats)}  # fmt: skip
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
