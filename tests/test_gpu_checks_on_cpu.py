"""The `gpu` tests' checks (tests/test_gpu.py) run on CPU, so that their logic, imports and
tolerances keep working between the rare sessions that have a GPU: each check on one case, with
bfloat16 on CPU against the float32 CPU reference (the tolerances are bf16's; the CPU rounds as
the GPU does, to the same 8 bits)."""

from __future__ import annotations

import torch
from tests import test_gpu as gpu_checks


def test_grouped_matmul_check_runs_on_cpu() -> None:
    errors = gpu_checks.check_grouped_matmuls("cpu", torch.bfloat16)
    assert set(errors) >= {"loop", "reference"}


def test_experts_check_runs_on_cpu() -> None:
    errors = gpu_checks.check_experts("loop", "clamped_swiglu", "cpu")
    assert 0 < errors["output"] < gpu_checks.FWD_TOL


def test_layer_check_runs_on_cpu() -> None:
    errors = gpu_checks.check_layer("deepseek-v3", "cpu")
    assert 0 < errors["output"] < gpu_checks.FWD_TOL


def test_model_check_runs_on_cpu() -> None:
    errors = gpu_checks.check_model("cpu", autocast_bf16=True)
    assert 0 < errors["loss"] < gpu_checks.FWD_TOL


def test_generation_checks_run_on_cpu() -> None:
    assert gpu_checks.check_greedy_float32("cpu").shape == (2, 16)
    assert gpu_checks.check_generate_bf16("cpu").shape == (2, 16)
