"""benchmarks/gpu_check.sh on a machine without CUDA: one clear line, a non-zero exit, no files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
