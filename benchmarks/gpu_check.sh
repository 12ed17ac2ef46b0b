#!/usr/bin/env bash
# The GPU check (issue 18): on one CUDA GPU, in under 8 minutes, everything moekit claims there.
#   1. the `gpu`-marked tests (tests/test_gpu.py): bf16 on CUDA against the float32 CPU reference;
#   2. benchmarks/moe_layer.py --device cuda --dtype bfloat16 at the Mixtral-like and the
#      DeepSeek-V3-like layer shapes (TFLOP/s, ratio to the dense FFN of equal active FLOPs and to
#      transformers' fastest MoE block);
#   3. a short `small`-preset training run in bf16 autocast (`moekit train`): tokens/s and MFU.
# Everything goes under one folder (default benchmarks/results/gpu_check_<UTC date-time>/, or the
# first argument), with summary.md and summary.json (benchmarks/gpu_check_summary.py). Each step
# has its own time limit (100 + 100 + 150 + 100 s: the whole stays under 8 minutes); a failed step
# does not stop the others, but the script then exits 1. Installs nothing: it runs the project's
# venv (.venv, from `make install`, with a CUDA build of torch; PYTHON=... picks another
# interpreter).
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

# summary.json and summary.md from the three steps' outputs.
"$PY" benchmarks/gpu_check_summary.py "$OUT" || failed=1

echo "results: $OUT (summary.md)" >&2
exit "$failed"
