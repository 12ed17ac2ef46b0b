"""Few-row products over quantized weights on CPU: moekit's kernels (`moekit.quant.kernels`, bf16,
int8, int4 with and without zero point, MXFP4; float32 x) against torch's built-ins and torchao on
the same shapes, and against the memory's streaming bandwidth measured in the same run.

Shapes (O, I) are a decode step's products: the experts of benchmarks/decode.py's 213M model
(768x1024, 2048x768, 1024x768) and its LM head (32000x768), and Qwen3-30B-A3B's expert
(768x2048, 2048x768) and attention (4096x2048) projections; R = 1 and 8 rows of x, 2 threads.

Contenders, each timed as a call from Python (what a decode step pays):
  - fp32: `moekit.inference.decode_kernels.linear` (float32 weight) and torch's F.linear (MKL);
  - ours: `moekit.quant.kernels.linear` over each scheme's stored layout, on both of its paths
    for int8 / int4 / MXFP4: "x-float" (weights dequantized to float32 in registers) and
    "x-int8" (x quantized to int8 per block of 32, integer dot products);
  - torch bf16: F.linear with x and W in bfloat16 (torch has no bf16-weight, float32-x product);
  - torch int8: `torch._weight_int8pack_mm` (int8 (O, I), per-channel scales), x float32 with
    float32 scales and x bfloat16 with bfloat16 scales;
  - torch int4: `torch._weight_int4pack_mm_for_cpu` over `torch._convert_weight_to_int4pack_for_cpu`
    (groups of 32; scale and zero per group in x's dtype), x float32 and bfloat16; fed the same
    nibbles as our int4 (its zero = our offset + 8 d);
  - torchao (if importable): `quantize_` with Int8WeightOnlyConfig and IntxWeightOnlyConfig(int4,
    groups of 32) on an nn.Linear, x float32 (torchao 0.18's CPU int4 layouts need mslk or are
    gone; these two dequantize the weight each call).
Every contender's output is checked against F.linear over its own dequantized weight first.

Each contender's weight is timed twice: `single`, one copy called again and again (it stays in
cache where it fits: L2 1 MiB, L3 32 MiB here), and `dram`, a pool of distinct copies of at least
POOL_BYTES (4x L3) called round-robin, so each call's weight was last touched POOL_BYTES of other
weights ago and comes from DRAM, as in decode. GB/s = the stored bytes of one weight (data,
scales, offsets) / the time of one call; the stream bound is a 2 GiB float32 `sum` (median of 5),
measured before each shape and after the last: the median of those is the bound (`stream_gb_s`;
each in `stream_gb_s_each`: on a shared machine it drifts by 20-30%).
Each figure is the median of REPEATS passes; contenders alternate within each pass.

    python benchmarks/quant_kernels.py            # ~3 minutes
    python benchmarks/quant_kernels.py --quick    # two small shapes, for the tests

Prints JSON; writes benchmarks/results/quant_kernels.json (or --out). Run it under the machine's
CPU lock, with nothing else heavy running (the JSON records the load average at the start). The
committed figures ran with OMP_WAIT_POLICY=PASSIVE (this machine's rule for shared CPUs): idle
OpenMP threads sleep, so every call that forks (moekit's and torch's alike) pays a wake-up, ~15 us
measured (a 64x1024 int8 product: 30 us passive, 15 us default); and each moekit call pays ~12 us
in Python (checks, ctypes): the small experts' figures are far from their weights' bound for that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moekit.cli.common import results_file
from moekit.inference import decode_kernels
from moekit.machine import machine_info
from moekit.quant import kernels, quantize
from moekit.quant.schemes import GROUP, QuantizedWeight

SHAPES = {
    "213M expert w_out": (768, 1024),
    "213M expert w_in": (2048, 768),
    "213M expert gate/up": (1024, 768),
    "213M lm_head": (32000, 768),
    "Qwen3-30B-A3B expert gate/up": (768, 2048),
    "Qwen3-30B-A3B expert down": (2048, 768),
    "Qwen3-30B-A3B attention q": (4096, 2048),
}
QUICK_SHAPES = {"small": (256, 512), "wide": (512, 256)}
ROWS = (1, 8)
POOL_BYTES = 128 * 2**20  # 4x the L3
REPEATS = 5
SECONDS_A_PASS = 0.04  # each contender's calls a pass last about this long


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _clone(qw: QuantizedWeight) -> QuantizedWeight:
    return QuantizedWeight(qw.scheme, *(None if t is None else t.clone() for t in (
        qw.data, qw.scales, qw.offsets)))  # fmt: skip


def contenders(w: torch.Tensor, have_torchao: bool) -> dict:
    """{name: (make a distinct copy of the weight -> object, call(x, object) -> y, bytes,
    reference(x) -> y)} for one float weight w (O, I)."""
    out = {}
    out["fp32 moekit"] = (w.clone, decode_kernels.linear, _nbytes(w), lambda x: F.linear(x, w))
    out["fp32 torch F.linear"] = (w.clone, F.linear, _nbytes(w), lambda x: F.linear(x, w))
    for scheme, zero_point in (
        ("bf16", False),
        ("int8", False),
        ("int4", False),
        ("int4", True),
        ("mxfp4", False),
    ):
        qw = quantize(w, scheme, zero_point=zero_point)
        deq = qw.dequantize()
        for mode in ("float",) if scheme == "bf16" else kernels.ACTIVATIONS:
            name = f"{scheme}{'_zp' if zero_point else ''} moekit"
            name += "" if scheme == "bf16" else f" x-{mode}"
            # on a CPU with AVX-512, the AVX2 body beside it where the wider steps differ
            # (int8 weights, and int8 x): what they gain
            wider = kernels.path() == "avx512" and "int8" in (scheme, mode)
            bodies = [None] + (["avx2"] if wider else [])
            for body in bodies:
                out[name + (f" ({body} body)" if body else "")] = (
                    lambda qw=qw: _clone(qw),
                    _ours(mode, body),
                    qw.nbytes,
                    lambda x, deq=deq: F.linear(x, deq),
                )
    w_bf16 = w.bfloat16()
    out["bf16 torch F.linear (x bf16)"] = (
        w_bf16.clone,
        lambda x, wb: F.linear(x.bfloat16(), wb),
        _nbytes(w_bf16),
        lambda x: F.linear(x.bfloat16().float(), w_bf16.float()),
    )
    int8 = quantize(w, "int8")
    for dtype in (torch.float32, torch.bfloat16):
        scales = int8.scales.to(dtype)
        out[f"int8 torch _weight_int8pack_mm (x {_short(dtype)})"] = (
            lambda scales=scales: (int8.data.clone(), scales.clone()),
            lambda x, t, dtype=dtype: torch._weight_int8pack_mm(x.to(dtype), *t),
            _nbytes(int8.data, scales),
            lambda x, scales=scales, dtype=dtype: F.linear(
                x.to(dtype).float(), int8.data.float() * scales.float()[:, None]
            ),
        )
    for zero_point in (False, True):
        int4 = quantize(w, "int4", zero_point=zero_point)
        nibbles = torch.stack((int4.data & 15, int4.data >> 4), -1).flatten(-2).to(torch.int32)
        packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        d = int4.scales.float()
        zero = torch.zeros_like(d) if int4.offsets is None else int4.offsets.float() + 8 * d
        for dtype in (torch.float32, torch.bfloat16):
            sz = torch.stack((d, zero), -1).transpose(0, 1).contiguous().to(dtype)  # (G, O, 2)
            deq = ((nibbles.float() - 8).unflatten(-1, (-1, GROUP)) * sz.float().transpose(0, 1)[
                ..., :1] + sz.float().transpose(0, 1)[..., 1:]).flatten(-2)  # fmt: skip
            name = (
                f"int4{'_zp' if zero_point else ''} torch _weight_int4pack_mm (x {_short(dtype)})"
            )
            out[name] = (
                lambda sz=sz, packed=packed: (packed.clone(), sz.clone()),
                lambda x, t, dtype=dtype: torch._weight_int4pack_mm_for_cpu(
                    x.to(dtype), t[0], GROUP, t[1]
                ),
                _nbytes(packed, sz),
                lambda x, deq=deq, dtype=dtype: F.linear(x.to(dtype).float(), deq),
            )
    if have_torchao:
        out.update(_torchao_contenders(w))
    return out


def _ours(mode: str, body: str | None = None):
    """kernels.linear, timed with x taken as `mode` ("float" or "int8") on `body` (None: the
    best this CPU runs); `measure` sets both around each call."""

    def call(x, qw):
        return kernels.linear(x, qw)

    call.activations, call.body = mode, body
    return call


def realistic_rows(kind: str, R: int, I: int, g: torch.Generator) -> torch.Tensor:
    """Decode activations with outliers. "rmsnorm": a residual stream with 4 massive channels
    (20x), RMS-normalized, times a norm weight 1 + 0.1 N(0, 1): what attention, the experts'
    gate/up and the LM head take. "swiglu": silu(gate) * up with gate, up ~ 1.5 N(0, 1) and 0.2%
    of entries 30x: what an expert's down projection takes."""
    if kind == "rmsnorm":
        h = torch.randn(R, I, generator=g)
        h[:, torch.randperm(I, generator=g)[:4]] *= 20
        gamma = 1 + 0.1 * torch.randn(I, generator=g)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)) * gamma
    gate, up = 1.5 * torch.randn(2, R, I, generator=g)
    x = F.silu(gate) * up
    spikes = torch.rand(R, I, generator=g) < 0.002
    return torch.where(spikes, 30 * x, x)


def activation_errors(shapes: dict, rows: int = 8) -> list[dict]:
    """Per shape and scheme, max |y - reference| / max |reference| over `rows` realistic rows, on
    both paths; reference = F.linear(x, dequantized W), the float computation the kernel stands
    for. `weight_error`: the same of F.linear(x, dequantized W) vs the float weight, for scale."""
    out = []
    for shape_name, (O, I) in shapes.items():
        kind = "swiglu" if "down" in shape_name or "w_out" in shape_name else "rmsnorm"
        g = torch.Generator().manual_seed(O * 11 + I)
        w = torch.randn(O, I, generator=g) / I**0.5
        x = realistic_rows(kind, rows, I, g)
        exact = F.linear(x, w)
        for scheme, zero_point in (
            ("int8", False),
            ("int4", False),
            ("int4", True),
            ("mxfp4", False),
        ):
            qw = quantize(w, scheme, zero_point=zero_point)
            reference = F.linear(x, qw.dequantize())
            row = {"shape": shape_name, "O": O, "I": I, "activations": kind, "rows": rows,
                   "scheme": scheme + ("_zp" if zero_point else ""),
                   "weight_error": _rel(reference, exact)}  # fmt: skip
            for mode in kernels.ACTIVATIONS:
                with torch.no_grad(), kernels.use_activations(mode):
                    row[f"max_rel_error_x_{mode}"] = _rel(kernels.linear(x, qw), reference)
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def _rel(y: torch.Tensor, reference: torch.Tensor) -> float:
    return float(f"{((y - reference).abs().max() / reference.abs().max()).item():.3g}")


def _torchao_contenders(w: torch.Tensor) -> dict:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    out = {}
    for name, config in (
        ("int8 torchao Int8WeightOnly", Int8WeightOnlyConfig()),
        ("int4 torchao IntxWeightOnly", IntxWeightOnlyConfig(torch.int4, PerGroup(GROUP))),
    ):

        def make(config=config):
            layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            with torch.no_grad():
                layer.weight.copy_(w)
            quantize_(layer, config)
            return layer

        probe = make()
        names, _ = probe.weight.__tensor_flatten__()  # the tensors it stores
        nbytes = _nbytes(*(getattr(probe.weight, n) for n in names))
        deq = probe.weight.dequantize().float()
        out[name] = (make, lambda x, layer: layer(x), nbytes, lambda x, deq=deq: F.linear(x, deq))
    return out


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.bfloat16: "bf16"}[dtype]


def measure(
    shapes: dict, rows: tuple[int, ...], pool_bytes: int, repeats: int, stream_bytes: int
) -> tuple[list[dict], list[float]]:
    """Every contender on every shape and row count; and the stream bandwidth measured before
    each shape and after the last (it drifts on a shared machine: the median is the bound)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from decode import stream_bandwidth  # the benchmarks' one stream measurement

    try:
        import torchao  # noqa: F401

        have_torchao = True
    except ImportError:
        have_torchao = False
    results, streams = [], []
    for shape_name, (O, I) in shapes.items():
        streams.append(stream_bandwidth(repeats=5, n_bytes=stream_bytes)["median"])
        g = torch.Generator().manual_seed(O * 7 + I)
        w = torch.randn(O, I, generator=g) / I**0.5
        entries = contenders(w, have_torchao)
        for R in rows:
            x = torch.randn(R, I, generator=g)
            timed = {}
            for name, (make, call, nbytes, reference) in entries.items():
                one = make()
                with torch.no_grad(), _kernel_choice(call):
                    y = call(x, one).float()
                    ref = reference(x)
                error = ((y - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
                pool = [one] + [make() for _ in range(max(1, pool_bytes // nbytes) - 1)]
                timed[name] = {"call": call, "single": [one], "dram": pool, "times": {}}
                timed[name]["row"] = {
                    "shape": shape_name,
                    "O": O,
                    "I": I,
                    "rows": R,
                    "contender": name,
                    "body": getattr(call, "body", None),  # ours on a set body; else None
                    "bytes": nbytes,
                    "bits_per_weight": round(8 * nbytes / (O * I), 3),
                    "dram_pool_copies": len(pool),
                    "max_error_vs_its_reference": float(f"{error:.3g}"),
                }
            for _ in range(repeats):
                for entry in timed.values():
                    for where in ("single", "dram"):
                        with _kernel_choice(entry["call"]):
                            seconds = _time_calls(entry["call"], x, entry[where])
                        entry["times"].setdefault(where, []).append(seconds)
            for entry in timed.values():
                row = entry["row"]
                for where in ("single", "dram"):
                    seconds = statistics.median(entry["times"][where])
                    row[f"us_{where}"] = round(seconds * 1e6, 2)
                    row[f"gb_s_{where}"] = round(row["bytes"] / seconds / 1e9, 2)
                results.append(row)
                print(json.dumps(row), flush=True)
            del timed
    streams.append(stream_bandwidth(repeats=5, n_bytes=stream_bytes)["median"])
    return results, streams


@contextlib.contextmanager
def _kernel_choice(call):
    """Our kernels' activation path and body as `call` asks (_ours); nothing for the others."""
    mode, body = getattr(call, "activations", None), getattr(call, "body", None)
    with contextlib.ExitStack() as stack:
        if mode:
            stack.enter_context(kernels.use_activations(mode))
        if body:
            stack.enter_context(kernels.use_path(body))
        yield


def _time_calls(call, x: torch.Tensor, pool: list) -> float:
    """Seconds a call, calling round-robin over `pool` for about SECONDS_A_PASS."""
    with torch.no_grad():
        call(x, pool[0])
        n, elapsed = 0, 0.0
        t0 = time.perf_counter()
        while elapsed < SECONDS_A_PASS or n < len(pool):
            for weight in pool:
                call(x, weight)
            n += len(pool)
            elapsed = time.perf_counter() - t0
    return elapsed / n


def summary(results: list[dict], stream: float) -> dict:
    """Per scheme, shape and rows: our kernel and the fastest library contender, DRAM figures."""
    out = {}
    for row in results:
        scheme = row["contender"].split(" ")[0]
        key = f"{scheme} | {row['shape']} | R={row['rows']}"
        entry = out.setdefault(key, {})
        side = "moekit" if " moekit" in row["contender"] else "library"
        body = row["body"]  # a body other than the best, beside it; None: the best
        for mode in kernels.ACTIVATIONS:
            if f"x-{mode}" in row["contender"].split(" "):
                entry[f"moekit_x_{mode}{f'_{body}_body' if body else ''}_gb_s_dram"] = row[
                    "gb_s_dram"
                ]
        if body:
            continue
        best = entry.get(side)
        if best is None or row["us_dram"] < best["us_dram"]:
            entry[side] = {
                "contender": row["contender"],
                "us_dram": row["us_dram"],
                "gb_s_dram": row["gb_s_dram"],
                "fraction_of_stream": round(row["gb_s_dram"] * 1e9 / stream, 3),
            }
    for entry in out.values():
        if "moekit" in entry and "library" in entry:
            entry["moekit_speedup"] = round(
                entry["library"]["us_dram"] / entry["moekit"]["us_dram"], 2
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, for the tests")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=results_file, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # torchao's notes about its CUDA-only libraries
    warnings.filterwarnings("ignore", module="torchao")
    torch.set_num_threads(args.threads)
    info = machine_info()
    results, streams = measure(
        QUICK_SHAPES if args.quick else SHAPES,
        ROWS,
        8 * 2**20 if args.quick else POOL_BYTES,
        2 if args.quick else REPEATS,
        2**28 if args.quick else 2**31,
    )
    stream = statistics.median(streams)
    for row in results:
        row["fraction_of_stream_dram"] = round(row["gb_s_dram"] * 1e9 / stream, 3)
    report = {
        "benchmark": "quant_kernels",
        "machine": info,
        "kernel_body": kernels.path(),
        "threads": args.threads,
        "stream_gb_s": round(stream / 1e9, 2),
        "stream_gb_s_each": [round(s / 1e9, 2) for s in streams],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
        "pool_bytes": 8 * 2**20 if args.quick else POOL_BYTES,
        "method": (
            "us per call from Python, median of passes; single = one weight called repeatedly "
            "(cached where it fits), dram = a round-robin pool of distinct copies of >= "
            "pool_bytes (4x L3), so each weight comes from DRAM; GB/s = stored bytes of one "
            "weight (data + scales + offsets) / time a call"
        ),
        "default_activations": kernels.DEFAULT_ACTIVATIONS,
        "summary_dram": summary(results, stream),
        "activation_errors": activation_errors(QUICK_SHAPES if args.quick else SHAPES),
        "results": results,
    }
    text = json.dumps(report, indent=1)
    print(text)
    out = args.out or (None if args.quick else Path(__file__).parent / "results/quant_kernels.json")
    if out is not None:
        out.write_text(text + "\n")


if __name__ == "__main__":
    main()
