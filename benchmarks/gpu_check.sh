#!/usr/bin/env bash
# The GPU check (issue 18): on one CUDA GPU, in under 8 minutes, everything moekit claims there.
#   1. the `gpu`-marked tests (tests/test_gpu.py): bf16 on CUDA against the float32 CPU reference;
#   2. benchmarks/moe_layer.py --device cuda --dtype bfloat16 at the Mixtral-like and the
#      DeepSeek-V3-like layer shapes (TFLOP/s, ratio to the dense FFN of equal active FLOPs and to
#      transformers' fastest MoE block);
#   3. a short `small`-preset training run in bf16 autocast (`moekit train`): tokens/s and MFU.
# Everything goes under one folder (default benchmarks/results/gpu_check_<UTC date-time>/, or the
# first argument), with summary.md and summary.json. Each step has its own time limit (100 + 100 +
# 150 + 100 s: the whole stays under 8 minutes); a failed step does not stop the others, but the
# script then exits 1. Installs nothing: it runs the project's venv (.venv, from `make install`,
# with a CUDA build of torch; PYTHON=... picks another interpreter).
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]
set -euo pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"

if [[ ! -x "$PY" ]] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check.sh: no Python at '$PY': run 'make install' (or set PYTHON)" >&2
    exit 2
fi
if ! "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1; then
    echo "gpu_check.sh: no CUDA device: torch.cuda.is_available() is False for $PY; this check needs one GPU" >&2
    exit 1
fi

OUT="${1:-benchmarks/results/gpu_check_$(date -u +%Y%m%d_%H%M%S)}"
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
# Fewer fragmentation failures when the DeepSeek-V3-like layer (11.3B parameters) is timed.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1

STATUS_FILE="$OUT/steps.tsv"
: >"$STATUS_FILE"
failed=0

# run_step NAME LIMIT_S CMD...: runs CMD under `timeout`, logs to $OUT/NAME.log, records
# NAME, exit code and seconds in steps.tsv.
run_step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" >&2
    local started rc=0
    started=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local took=$(($(date +%s) - started))
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >>"$STATUS_FILE"
    if [[ $rc -ne 0 ]]; then
        failed=1
        echo "   $name FAILED (exit $rc after ${took}s; 124 = time limit): see $OUT/$name.log" >&2
        tail -n 5 "$OUT/$name.log" >&2 || true
    else
        echo "   $name ok (${took}s)" >&2
    fi
}

"$PY" -c 'import json, torch; from moekit.machine import machine_info; print(json.dumps({**machine_info(), "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}, indent=2))' >"$OUT/machine.json"

# 1. gpu tests (seconds on an H100; the limit covers CUDA start-up and the float32 references).
run_step gpu_tests 100 "$PY" -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml"

# 2. one MoE layer, forward + backward, at each GPU-sized shape (8192 tokens), one process per
#    shape: a failure at one (a parity assertion, memory) keeps the other's results.
run_step moe_layer_mixtral 100 "$PY" benchmarks/moe_layer.py --device cuda --dtype bfloat16 \
    --shapes mixtral --out "$OUT/moe_layer_cuda_bfloat16_mixtral.json"
run_step moe_layer_deepseek_v3 150 "$PY" benchmarks/moe_layer.py --device cuda \
    --dtype bfloat16 --shapes deepseek-v3 --out "$OUT/moe_layer_cuda_bfloat16_deepseek-v3.json"

# 3. a short `small` run in bf16 autocast: 200 steps of 64 x 256 tokens, the tokenizer trained
#    on 400 standard-library files (cached in the results folder), evaluation and a checkpoint
#    only at the end.
run_step train_small 100 "$PY" -m moekit train small --out "$OUT/train_small" \
    --train.device=cuda --train.bf16=true --train.steps=200 --train.batch_size=64 \
    --train.seq_len=256 --train.warmup_steps=20 --train.log_every=20 --train.progress=false \
    --train.tensorboard=false --train.eval.every=0 --train.eval.batches=2 \
    --train.checkpoint.every=0 --train.data.max_files=400 --train.data.cache_dir="$OUT/cache"

"$PY" - "$OUT" <<'PY' || failed=1
"""summary.json and summary.md from the three steps' outputs."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from moekit.config import RunConfig
from moekit.model.params import parameter_breakdown

out = Path(sys.argv[1])
machine = json.loads((out / "machine.json").read_text())
gpu = machine["gpu"]
# Dense bf16 peak (no sparsity), from the GPU's name.
PEAKS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
         ("A100", 312e12))
peak = next((flops for name, flops in PEAKS if name in gpu), None)
steps = {}
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, took, limit = line.split("\t")
    steps[name] = {"exit_code": int(rc), "seconds": int(took), "limit_s": int(limit)}
summary = {"gpu": gpu, "torch": machine["torch"], "cuda": machine.get("cuda"), "steps": steps}
md = [f"# GPU check: {gpu}", "", f"torch {machine['torch']}, CUDA {machine.get('cuda')}", ""]
md += ["| step | exit | seconds (limit) |", "|---|---|---|"]
md += [f"| {n} | {s['exit_code']} | {s['seconds']} ({s['limit_s']}) |" for n, s in steps.items()]

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
    row = {"label": shape["label"], "tflops_per_s": shape["tflops_per_s"],
           "median_ms": {n: t["median_ms"] for n, t in shape["times"].items()},
           "ratios": r, "errors": shape["errors"],
           "cuda_peak_memory_gib": shape.get("cuda_peak_memory_gib")}
    rows.append(row)
    md += ["", f"### {shape['label']}", "", "| contender | median ms | TFLOP/s |", "|---|---|---|"]
    for name, ms in row["median_ms"].items():
        md.append(f"| {name} | {ms:.2f} | {shape['tflops_per_s'][name]:.1f} |")
    md.append("")
    md.append(f"moekit/grouped_mm / dense FFN of equal active FLOPs = "
              f"{r.get('moekit/grouped_mm_over_dense')}; fastest transformers "
              f"({r.get('fastest_hf')}) / moekit/grouped_mm = "
              f"{r.get('fastest_hf_over_moekit/grouped_mm')}; peak memory "
              f"{row['cuda_peak_memory_gib']} GiB; not run: {sorted(shape['errors'])}")
summary["moe_layer"] = rows

metrics = out / "train_small" / "metrics.jsonl"
if metrics.exists():
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("kind") == "train"]
    steady = train[1:] or train  # the first interval holds start-up (CUDA init, warm-up)
    seconds = sum(r["seconds"] for r in steady)
    tokens_per_s = sum(r["tokens_per_s"] * r["seconds"] for r in steady) / seconds
    cfg = RunConfig.from_json((out / "train_small" / "config.json").read_text())
    active = parameter_breakdown(cfg.model)["active"]
    mfu = 6 * active * tokens_per_s / peak if peak else None
    summary["train_small"] = {
        "tokens_per_s": round(tokens_per_s), "active_params": active,
        "peak_bf16_flops": peak, "mfu": round(mfu, 4) if mfu is not None else None,
        "final_train_loss": train[-1]["loss"] if train else None,
        "val_loss": next((r["val_loss"] for r in reversed(records) if r.get("kind") == "eval"),
                         None),
        "mfu_definition": "6 * active parameters * tokens/s / peak dense bf16 FLOP/s; active "
        "parameters include the (tied) embedding as the LM head; attention's sequence-length "
        "term is not counted; tokens/s over the log intervals after the first",
    }
    s = summary["train_small"]
    md += ["", "## small preset, bf16 autocast, 200 steps of 64 x 256 tokens", ""]
    md.append(f"{s['tokens_per_s']:,} tokens/s, {active:,} active parameters, MFU "
              + (f"{100 * mfu:.2f}% of {peak / 1e12:.0f} TFLOP/s (dense bf16 peak of '{gpu}', "
                 "from its name)" if mfu is not None else f"unknown (no peak known for '{gpu}')")
              + f"; final train loss {s['final_train_loss']}, validation loss {s['val_loss']}")
    md += ["", s["mfu_definition"] + "."]

(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
(out / "summary.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PY

echo "results: $OUT (summary.md)" >&2
exit "$failed"
