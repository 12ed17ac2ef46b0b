"""summary.json and summary.md of a GPU check (benchmarks/gpu_check.sh) from its three steps'
outputs in its results folder: steps.tsv and machine.json, the gpu tests' junit XML, the
moe_layer_cuda_bfloat16_*.json benchmarks (TFLOP/s, ratios) and train_small/metrics.jsonl
(tokens/s, MFU against the GPU's dense bf16 peak, looked up from its name). A step that left
nothing behind is left out; the markdown is printed too.

    python benchmarks/gpu_check_summary.py RESULTS_DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from moekit.config import RunConfig
from moekit.fileio import atomic_write_json, atomic_write_text
from moekit.model.params import parameter_breakdown
from moekit.train.metrics import read_metrics

# Dense bf16 peak FLOP/s (no sparsity): the first whose name the GPU's name contains.
PEAKS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def main(out_dir: Path | str) -> dict:
    """Write summary.json and summary.md into out_dir, print the markdown, return the summary."""
    out = Path(out_dir)
    machine = json.loads((out / "machine.json").read_text())
    gpu = machine["gpu"]
    peak = next((flops for name, flops in PEAKS if name in gpu), None)
    steps = {}
    for line in (out / "steps.tsv").read_text().splitlines():
        name, rc, took, limit = line.split("\t")
        steps[name] = {"exit_code": int(rc), "seconds": int(took), "limit_s": int(limit)}
    summary = {"gpu": gpu, "torch": machine["torch"], "cuda": machine.get("cuda"), "steps": steps}
    md = [f"# GPU check: {gpu}", "", f"torch {machine['torch']}, CUDA {machine.get('cuda')}", ""]
    md += ["| step | exit | seconds (limit) |", "|---|---|---|"]
    for n, s in steps.items():
        md.append(f"| {n} | {s['exit_code']} | {s['seconds']} ({s['limit_s']}) |")

    junit = out / "gpu_tests.xml"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        summary["gpu_tests"] = counts
        md += ["", "## gpu tests", "", ", ".join(f"{k} {v}" for k, v in counts.items())]

    benches = sorted(out.glob("moe_layer_cuda_bfloat16_*.json"))
    rows = []
    if benches:
        md += ["", "## One MoE layer, forward + backward, bf16 (moe_layer.py)"]
    for shape in [s for bench in benches for s in json.loads(bench.read_text())["shapes"]]:
        # each shape's table, then its ratios (moekit/grouped_mm: what "auto" picks on a GPU)
        r = shape["ratios"]
        row = {
            "label": shape["label"],
            "tflops_per_s": shape["tflops_per_s"],
            "median_ms": {n: t["median_ms"] for n, t in shape["times"].items()},
            "ratios": r,
            "errors": shape["errors"],
            "cuda_peak_memory_gib": shape.get("cuda_peak_memory_gib"),
        }
        rows.append(row)
        md += ["", f"### {shape['label']}", ""]
        md += ["| contender | median ms | TFLOP/s |", "|---|---|---|"]
        for name, ms in row["median_ms"].items():
            md.append(f"| {name} | {ms:.2f} | {shape['tflops_per_s'][name]:.1f} |")
        md.append("")
        md.append(
            f"moekit/grouped_mm / dense FFN of equal active FLOPs = "
            f"{r.get('moekit/grouped_mm_over_dense')}; fastest transformers "
            f"({r.get('fastest_hf')}) / moekit/grouped_mm = "
            f"{r.get('fastest_hf_over_moekit/grouped_mm')}; peak memory "
            f"{row['cuda_peak_memory_gib']} GiB; not run: {sorted(shape['errors'])}"
        )
    summary["moe_layer"] = rows

    # A run stopped before its first log interval (time limit, memory) leaves no train record.
    records = read_metrics(out / "train_small" / "metrics.jsonl")
    train = [r for r in records if r.get("kind") == "train"]
    if train:
        steady = train[1:] or train  # the first interval holds start-up (CUDA init, warm-up)
        seconds = sum(r["seconds"] for r in steady)
        tokens_per_s = sum(r["tokens_per_s"] * r["seconds"] for r in steady) / seconds
        cfg = RunConfig.from_json((out / "train_small" / "config.json").read_text())
        active = parameter_breakdown(cfg.model)["active"]
        mfu = 6 * active * tokens_per_s / peak if peak else None
        summary["train_small"] = {
            "tokens_per_s": round(tokens_per_s),
            "active_params": active,
            "peak_bf16_flops": peak,
            "mfu": round(mfu, 4) if mfu is not None else None,
            "final_train_loss": train[-1]["loss"],
            "val_loss": next(
                (r["val_loss"] for r in reversed(records) if r.get("kind") == "eval"), None
            ),
            "mfu_definition": "6 * active parameters * tokens/s / peak dense bf16 FLOP/s; active "
            "parameters include the (tied) embedding as the LM head; attention's sequence-length "
            "term is not counted; tokens/s over the log intervals after the first",
        }
        s = summary["train_small"]
        md += ["", "## small preset, bf16 autocast, 200 steps of 64 x 256 tokens", ""]
        md.append(
            f"{s['tokens_per_s']:,} tokens/s, {active:,} active parameters, MFU "
            + (
                f"{100 * mfu:.2f}% of {peak / 1e12:.0f} TFLOP/s (dense bf16 peak of '{gpu}', "
                "from its name)"
                if mfu is not None
                else f"unknown (no peak known for '{gpu}')"
            )
            + f"; final train loss {s['final_train_loss']}, validation loss {s['val_loss']}"
        )
        md += ["", s["mfu_definition"] + "."]

    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_check_summary.py RESULTS_DIR")
    main(sys.argv[1])
