"""benchmarks/gpu_check.sh on a machine without CUDA: one clear line, a non-zero exit, no files;
and its summary (benchmarks/gpu_check_summary.py) of real step outputs made on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.run_cases import JSON_PACKAGE
from tests.test_benchmarks import load_benchmark

from moekit.config import RunConfig
from moekit.machine import machine_info
from moekit.model import MoETransformer

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the whole check")
def test_gpu_check_fails_loudly_without_cuda(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"gpu_check.sh: no CUDA device: torch.cuda.is_available() is False for {sys.executable}; "
        "this check needs one GPU"
    ]
    assert not out.exists()


def test_gpu_check_is_strict_bash() -> None:
    """It stops on the first unchecked error, unset variable or failed pipe stage."""
    assert "set -euo pipefail" in SCRIPT.read_text()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


SUMMARY = SCRIPT.with_name("gpu_check_summary.py")
H100 = "NVIDIA H100 80GB HBM3"  # torch.cuda.get_device_name(0) on an H100 SXM
TINY_TESTS = """
import pytest

def test_passes():
    assert True

def test_passes_too():
    assert 1 + 1 == 2

def test_fails():
    assert False

@pytest.mark.skip(reason="as a gpu test without a GPU")
def test_skipped():
    pass
"""


def active_parameters(model_config) -> int:
    """Active parameters per token, counted here from the model's parameters: all of them, the
    routed experts' at top_k / n_experts (the check's MFU counts the embedding and LM head too)."""
    with torch.device("meta"):
        model = MoETransformer(model_config)
    moe = model_config.moe
    return sum(
        p.numel() * moe.top_k // moe.n_experts if ".ffn.experts." in name else p.numel()
        for name, p in model.named_parameters()
        if not name.startswith("mtp.")
    )


@pytest.mark.slow
def test_gpu_check_summary_of_real_step_outputs(tmp_path: Path, monkeypatch) -> None:
    """gpu_check.sh's three steps, each really run at CPU size into one results folder as the
    script lays it out (a fake H100 in machine.json), then its summary as the script runs it:
    every figure in summary.json and summary.md is what those outputs imply."""
    out = tmp_path / "results"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    steps = {}
    # run_step below writes steps.tsv as the script's own run_step does: that line still there
    status_line = r'''printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "$limit" >>"$STATUS_FILE"'''
    assert status_line in SCRIPT.read_text()

    def run_step(name: str, limit: int, *cmd: str) -> None:  # gpu_check.sh's run_step
        started = time.time()
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=limit)
        took = int(time.time() - started)
        steps[name] = {"exit_code": rc.returncode, "seconds": took, "limit_s": limit}
        with open(out / "steps.tsv", "a") as tsv:
            tsv.write(f"{name}\t{rc.returncode}\t{took}\t{limit}\n")

    machine = {**machine_info(), "gpu": H100, "cuda": "12.4"}
    (out / "machine.json").write_text(json.dumps(machine, indent=2) + "\n")
    tiny_tests = tmp_path / "tiny_tests.py"
    tiny_tests.write_text(TINY_TESTS)
    py = sys.executable
    pytest_cmd = [py, "-m", "pytest", str(tiny_tests), "-q", "-p", "no:cacheprovider"]
    run_step("gpu_tests", 60, *pytest_cmd, f"--junitxml={out / 'gpu_tests.xml'}")
    # moe_layer.py's smallest shapes (--quick), one timed round, in the name the summary reads.
    bench_json = out / "moe_layer_cuda_bfloat16_quick.json"
    bench_opts = ["--quick", "--dtype=bfloat16", "--threads=1", "--iters=1", "--no-profile"]
    run_step("moe_layer_quick", 60, py, str(SCRIPT.parent / "moe_layer.py"), *bench_opts,
             f"--out={bench_json}")  # fmt: skip
    train_opts = [
        "--train.device=cpu", "--train.steps=6", "--train.batch_size=4", "--train.seq_len=32",
        "--train.warmup_steps=2", "--train.log_every=2", "--train.progress=false",
        "--train.tensorboard=false", "--train.eval.every=0", "--train.eval.batches=1",
        "--train.checkpoint.every=0", f"--train.data.source={JSON_PACKAGE}",
        "--train.data.tokenizer=bytes", f"--train.data.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    run_step("train_small", 60, py, "-m", "moekit", "train", "tiny", f"--out={out / 'train_small'}",
             *train_opts)  # fmt: skip
    logs = {name: (out / f"{name}.log").read_text()[-2000:] for name in steps}
    assert [s["exit_code"] for s in steps.values()] == [1, 0, 0], logs  # one tiny test fails

    done = subprocess.run(  # as gpu_check.sh runs it
        [py, str(SUMMARY), str(out)], cwd=SCRIPT.parent.parent, capture_output=True, text=True,
        env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    md = (out / "summary.md").read_text()
    assert done.stdout == md
    summary = json.loads((out / "summary.json").read_text())
    assert summary["gpu"] == H100 and summary["cuda"] == "12.4"
    assert summary["torch"] == torch.__version__
    assert summary["steps"] == steps
    for name, s in steps.items():
        assert f"| {name} | {s['exit_code']} | {s['seconds']} ({s['limit_s']}) |" in md
    assert summary["gpu_tests"] == {"tests": 4, "failures": 1, "errors": 0, "skipped": 1}
    assert "tests 4, failures 1, errors 0, skipped 1" in md

    bench = json.loads(bench_json.read_text())
    assert len(summary["moe_layer"]) == len(bench["shapes"]) == 2
    for row, shape in zip(summary["moe_layer"], bench["shapes"], strict=True):
        assert row["label"] == shape["label"]
        assert row["tflops_per_s"] == shape["tflops_per_s"]
        assert row["median_ms"] == {n: t["median_ms"] for n, t in shape["times"].items()}
        assert row["ratios"] == shape["ratios"] and row["errors"] == shape["errors"]
        assert row["cuda_peak_memory_gib"] is None  # recorded on CUDA only
        assert "moekit/grouped_mm" in row["median_ms"] and "dense_swiglu" in row["median_ms"]
        for name, t in shape["times"].items():
            assert f"| {name} | {t['median_ms']:.2f} | {shape['tflops_per_s'][name]:.1f} |" in md
        r = shape["ratios"]
        assert (
            f"= {r['moekit/grouped_mm_over_dense']}; fastest transformers ({r['fastest_hf']}) "
            f"/ moekit/grouped_mm = {r['fastest_hf_over_moekit/grouped_mm']}; peak memory None"
        ) in md

    # tokens/s over the log intervals after the first, from the records' cumulative token counts
    records = [json.loads(line) for line in (out / "train_small/metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6]
    tokens_per_s = (train[-1]["tokens"] - train[0]["tokens"]) / sum(r["seconds"] for r in train[1:])
    run_config = RunConfig.from_json((out / "train_small/config.json").read_text())
    active = active_parameters(run_config.model)
    s = summary["train_small"]
    assert abs(s["tokens_per_s"] - tokens_per_s) <= 0.5 + 1e-6
    assert s["active_params"] == active
    assert s["peak_bf16_flops"] == 989e12  # an H100 SXM's dense bf16 peak
    assert s["mfu"] == round(6 * active * tokens_per_s / 989e12, 4)
    assert s["final_train_loss"] == train[-1]["loss"]
    assert s["val_loss"] == next(r["val_loss"] for r in records if r["kind"] == "eval")
    assert f"{s['tokens_per_s']:,} tokens/s, {active:,} active parameters, MFU " in md
    assert f"of 989 TFLOP/s (dense bf16 peak of '{H100}', from its name)" in md

    # At an H100's peak a CPU run's MFU rounds to 0 at 4 places: against a peak this run could
    # reach, the MFU is a number to check.
    module = load_benchmark("gpu_check_summary")
    peak = 1e12
    monkeypatch.setattr(module, "PEAKS", (("H100", peak),))
    mfu = 6 * active * tokens_per_s / peak
    assert module.main(out)["train_small"]["mfu"] == pytest.approx(mfu, abs=6e-5)
    md = (out / "summary.md").read_text()
    assert mfu > 0.001 and f"MFU {100 * mfu:.2f}% of 1 TFLOP/s" in md

    # A training run stopped before its first log interval leaves an empty metrics.jsonl: the
    # summary is still written, without the training part.
    (out / "train_small/metrics.jsonl").write_text("")
    (out / "summary.json").unlink()
    summary = module.main(out)
    assert "train_small" not in summary and len(summary["moe_layer"]) == 2
    assert json.loads((out / "summary.json").read_text()) == summary
