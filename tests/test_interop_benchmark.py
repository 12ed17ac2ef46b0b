"""benchmarks/load_hf.py runs end to end on a small checkpoint (its figures are judged on the
~1 GB run whose results are committed, not here)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "load_hf.py"


@pytest.mark.slow
def test_load_benchmark_measures_moekit_in_a_fresh_process(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("benchmark_load_hf", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "load_hf.json"
    report = bench.main(["--quick", "--loaders", "moekit", "--layouts", "fused", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    row = report["layouts"]["fused"]
    mine = row["moekit"]
    assert mine["parameters"] == row["checkpoint"]["parameters"] > 0 and mine["seconds"] > 0
    # A 40 MB checkpoint: the model plus a bounded margin (32 MB mapped, one 16 MB slice).
    size = row["checkpoint"]["bytes"]
    assert size <= mine["after_load_above_baseline_bytes"] + 4 * 2**20
    assert mine["peak_above_baseline_bytes"] <= size + 64 * 2**20
    assert report["machine"]["cpu_count"] and report["machine"]["torch"]
