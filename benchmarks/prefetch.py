"""How far ahead the quantized decode kernels should prefetch their weights, on this host.

`moekit/quant/kernels.c` prefetches the weight stream in software, PREFETCH bytes ahead on the
float path (bf16, int8 weights) and X8_PREFETCH on the int8-activation path (int4, MXFP4), both
compile-time constants (`kernels_avx2.h`, `kernels_avx2_x8.h`). This builds the kernels once per
distance (`-DPREFETCH=N -DX8_PREFETCH=N`, the library's own flags otherwise), loads every build
into this one process, and times one product per call from DRAM: a round-robin pool of distinct
copies of each weight (POOL_BYTES, far beyond the L3), every call going to the next build in turn,
so that the host's drift (20-30% here from minute to minute) falls on every distance alike. Each
figure is the median over all of a build's calls (tens to thousands, by the weight's size); each
build's outputs are first checked equal, bit for bit, to the default build's (a prefetch changes
no sum). The verdict, `recommended`: the smallest distance whose time, relative to the default
build's and averaged (geometric mean) over every scheme and shape, is within TIE (1%) of the
best distance's: a farther prefetch that gains less than the noise is no gain.

Shapes: Qwen3-30B-A3B's expert products (768x2048, 2048x768) and attention q (4096x2048), one
row of x (a batch-1 decode step), 2 threads, bf16 / int8 / int4 / MXFP4 as `moekit quantize`
stores them, each on its default path (kernels.DEFAULT_ACTIVATIONS).

    python benchmarks/prefetch.py                        # ~4 minutes: 1024 2048 4096 8192
    python benchmarks/prefetch.py --distances 2048 4096  # any set
    python benchmarks/prefetch.py --body avx2            # the AVX2 body on an AVX-512 CPU
    python benchmarks/prefetch.py --quick                # small, for the tests

Prints JSON; writes benchmarks/results/prefetch.json (or --out). Run it under the CPU lock.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moekit import cbuild
from moekit.cbuild import optional_ptr
from moekit.cli.common import positive_int, results_file
from moekit.fileio import atomic_write_json
from moekit.machine import machine_info
from moekit.quant import kernels, quantize

SHAPES = {
    "Qwen3-30B-A3B expert gate/up": (768, 2048),
    "Qwen3-30B-A3B expert down": (2048, 768),
    "Qwen3-30B-A3B attention q": (4096, 2048),
}
QUICK_SHAPES = {"small": (256, 512)}
SCHEMES = ("bf16", "int8", "int4", "mxfp4")
DISTANCES = (1024, 2048, 4096, 8192)
POOL_BYTES = 2**30
ROUNDS = 6  # passes over the pool; each pass starts the alternation at another build
TIE = 0.01  # distances within this of the best (relative time) count as the best
DEFAULT = "default"  # the build with the source's own constants, the reference for the outputs


def build(
    name: str, distance: int | None, body: str | None = None, source: Path = kernels.SOURCE
) -> ctypes.CDLL:
    """The kernels (`source`: kernels.c, beside the bodies it includes) compiled with both
    prefetch distances set to `distance` (None: the source's own), running `body` ("avx2",
    "avx512"; None: the best this CPU runs) with the default activations; `body` set on the
    library to the body it runs. A library of its own, `name` in its build flags: never moekit's
    (whose body a benchmark would otherwise set), nor another build's with the same source."""
    flags = (*cbuild.FLAGS_O2, f"-DMOEKIT_BENCHMARK_BUILD={name}")
    if distance is not None:
        flags = (*flags, f"-DPREFETCH={distance}", f"-DX8_PREFETCH={distance}")
    try:
        library = ctypes.CDLL(str(cbuild.build(source, flags)))
    except subprocess.CalledProcessError as err:
        raise ValueError(f"{source} does not compile: {err.stderr.strip()[-1500:]}") from None
    if not hasattr(library, "moekit_q_set_x8"):
        raise ValueError(f"{source} predates the int8-activation path (moekit_q_set_x8)")
    calls = ("moekit_q_linear", "moekit_q_set_path", "moekit_q_set_x8")  # what this file calls
    cbuild.typed(library, {name: kernels.SIGNATURES[name] for name in calls})
    library.moekit_q_set_x8(kernels._x8_mask(kernels.DEFAULT_ACTIVATIONS))
    chosen = library.moekit_q_set_path(-1 if body is None else kernels.PATHS.index(body))
    if chosen < 0 or (body is not None and kernels.PATHS[chosen] != body):
        raise ValueError(f"this CPU (or the source's kernels) cannot run the {body} body")
    library.body = kernels.PATHS[chosen]
    return library


def check_body(parser: argparse.ArgumentParser, body: str | None) -> None:
    """--body refused before anything is built if this CPU cannot run it."""
    if body is not None and (why := kernels.cannot_run(body)):
        parser.error(why)


def geomean(values) -> float:
    return math.exp(statistics.mean(map(math.log, values)))


def measure(libraries: dict, scheme: str, O: int, I: int, pool_bytes: int, rounds: int) -> dict:
    """Median us a call of each build over one (O, I) product of `scheme`, from a pool of
    distinct copies of at least pool_bytes (two at least: a small pool stays in cache), each
    build's outputs first checked equal to the DEFAULT build's."""
    qw = quantize(torch.randn(O, I) * 0.02, scheme)
    copies = max(2, pool_bytes // qw.nbytes)
    pool = [tuple(None if t is None else t.clone() for t in (qw.data, qw.scales, qw.offsets))
            for _ in range(copies)]  # fmt: skip
    kind = kernels._kind(scheme, qw.offsets)
    x = torch.randn(1, I)
    names = list(libraries)

    def call(name: str, weight: tuple, y: torch.Tensor) -> None:
        data, scales, offsets = weight
        status = libraries[name].moekit_q_linear(
            kind, x.data_ptr(), 1, I, data.data_ptr(), optional_ptr(scales),
            optional_ptr(offsets), O, None, y.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError(f"moekit_q_linear refused {scheme} {O}x{I}")

    outputs = {name: torch.empty(1, O) for name in names}
    for name in names:
        call(name, pool[0], outputs[name])
    mismatched = [n for n in names if not torch.equal(outputs[n], outputs[DEFAULT])]
    if mismatched:
        raise AssertionError(f"{scheme} {O}x{I}: builds {mismatched} differ from the default's")
    times = {name: [] for name in names}
    y = torch.empty(1, O)
    for r in range(rounds):
        for j, weight in enumerate(pool):
            name = names[(j + r) % len(names)]
            start = time.perf_counter()
            call(name, weight, y)
            times[name].append(time.perf_counter() - start)
    us = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    return {
        "scheme": scheme,
        "O": O,
        "I": I,
        "bytes": qw.nbytes,
        "calls_each": len(times[names[0]]),
        "us": {name: round(v, 2) for name, v in us.items()},
        "gb_s": {name: round(qw.nbytes / v / 1e3, 2) for name, v in us.items()},
    }


def verdict(rows: list[dict], distances: list[int]) -> tuple[dict[str, float], int]:
    """Each distance's time over the default build's, geometric mean over `rows`, and the
    smallest distance within TIE of the best."""
    relative = {}
    for d in map(str, distances):
        relative[d] = geomean(r["us"][d] / r["us"][DEFAULT] for r in rows)
    best = min(relative.values())
    return relative, min(d for d in distances if relative[str(d)] <= best * (1 + TIE))


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this benchmark and kernel_ab.py share."""
    parser.add_argument("--quick", action="store_true", help="one small shape, for the tests")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument(
        "--body", choices=kernels.PATHS[1:], help="kernel body (default: the best this CPU runs)"
    )
    parser.add_argument("--out", type=results_file, default=None)


def report_head(name: str, args: argparse.Namespace, library: ctypes.CDLL) -> dict:
    """What a report of `name` records first: the machine and how the kernels ran (`library`'s
    body)."""
    return {
        "benchmark": name,
        "machine": machine_info(),
        "kernel_body": library.body,
        "threads": args.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }


def write_report(name: str, args: argparse.Namespace, report: dict) -> dict:
    """Print the report; write it to --out, or results/NAME.json unless --quick."""
    default = Path(__file__).parent / f"results/{name}.json"
    out = args.out or (None if args.quick else default)
    print(atomic_write_json(out, report) if out is not None else json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distances", type=int, nargs="+", default=list(DISTANCES))
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    check_body(parser, args.body)
    if any(d < 0 for d in args.distances):
        parser.error(f"--distances must be byte counts >= 0, not {args.distances}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    libraries = {
        DEFAULT: build(DEFAULT, None, args.body),
        **{str(d): build(str(d), d, args.body) for d in args.distances},
    }
    pool_bytes, rounds = (8 * 2**20, 2) if args.quick else (POOL_BYTES, ROUNDS)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows = []
    for scheme in SCHEMES:
        for label, (O, I) in shapes.items():
            rows.append({"shape": label, **measure(libraries, scheme, O, I, pool_bytes, rounds)})
    relative, recommended = verdict(rows, args.distances)
    report = {
        **report_head("prefetch", args, libraries[DEFAULT]),
        "pool_bytes": pool_bytes,
        "distances": args.distances,
        "method": (
            "one product a call from Python through ctypes, 1 row, from a round-robin pool of "
            "distinct copies; consecutive calls go to the builds in turn; medians of each build's "
            "calls; 'default' is the build with the source's own PREFETCH / X8_PREFETCH"
        ),
        "relative_time": {d: round(v, 4) for d, v in relative.items()},
        "recommended": recommended,
        "results": rows,
    }
    return write_report("prefetch", args, report)


if __name__ == "__main__":
    main()
