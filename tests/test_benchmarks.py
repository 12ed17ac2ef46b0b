"""The benchmark scripts run end to end on tiny shapes (their numbers are not judged here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_moe_layer_benchmark_quick(tmp_path):
    pytest.importorskip("transformers")
    bench = load_benchmark("moe_layer")
    out = tmp_path / "moe_layer.json"
    result = bench.main(
        ["--quick", "--threads", "1", "--out", str(out), "--no-profile", "--malloc", "glibc"]
    )
    assert out.exists()
    expected = {"moekit/grouped_mm", "moekit/loop", "dense_swiglu"}
    for family in ("mixtral", "qwen3_moe"):
        expected |= {f"hf_{family}/{impl}" for impl in ("eager", "grouped_mm")}
    for shape in result["shapes"]:
        assert expected <= set(shape["times"]), shape["errors"]
        for name in set(shape["times"]) | set(shape["errors"]):
            ran = name in shape["times"]
            assert ran != (name in shape["errors"]), name  # each contender either ran or says why
            assert not ran or shape["times"][name]["median_ms"] > 0
        parity = shape["parity"]
        assert parity["passed"] and parity["worst"] <= bench.PARITY_ATOL
        assert {n for n in shape["times"] if n != "dense_swiglu"} - {parity["reference"]} == set(
            parity["max_abs"]
        )
        assert shape["activations"]["moekit_within_bound"]
    assert result["machine"]["torch"] and result["machine"]["cpu_model"]
    assert len(result["targets"]) == 2 * len(bench.TARGETS)


@pytest.mark.slow
def test_offload_benchmark_quick(tmp_path):
    bench = load_benchmark("offload")
    out = tmp_path / "offload.json"
    result = bench.main(["--quick", "--out", str(out)])
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    assert result["checks"]["all_bit_identical"]
    budgets = {r["budget"] for r in result["runs"]}
    assert budgets == {*bench.BUDGETS, result["model"]["top_k"]}
    assert all(0 <= r["belady_hit_rate"] <= 1 and r["tokens_per_s"] > 0 for r in result["runs"])
    peaks = result["memory"]["peak_rss_above_imports_bytes"]
    assert set(peaks) == {"all", "0.5"} and min(peaks.values()) > 0


def test_moe_vs_dense_overrides_change_the_moe_run_only():
    bench = load_benchmark("moe_vs_dense")
    args = bench.parse_args(["--steps", "8", "--model.moe.n_experts=16", "--model.moe.top_k=3"])
    configs = bench.run_configs(args)
    assert (configs["small"].model.moe.n_experts, configs["small"].model.moe.top_k) == (16, 3)
    assert configs["dense-small"].model.moe is None
    assert configs["small"].train == configs["dense-small"].train  # same steps, data and seed
    with pytest.raises(SystemExit):
        bench.parse_args(["--train.lr=1"])  # only the MoE model may differ


@pytest.mark.slow
def test_moe_designs_benchmark_measures_every_design_against_the_same_seeds_dense(tmp_path):
    bench = load_benchmark("moe_designs")
    out = tmp_path / "designs.json"
    result = bench.main(["--preset", "tiny", "--steps", "6", "--evals", "3", "--seeds", "2",
                         "--out", str(out)])  # fmt: skip
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    designs = result["designs"]
    assert set(designs) == set(
        bench.default_designs(bench.base_config(bench.parse_args(["--preset", "tiny"])))
    )
    assert designs["dense"]["step_ratio_per_seed"] == [1.0, 1.0]  # dense reaches its own final
    for name, design in designs.items():
        losses = design["final_val_loss_per_seed"]
        assert len(losses) == 2 and losses[0] != losses[1], name  # two seeds, two runs
        dense = [runs["dense"]["final_val_loss"] for runs in result["runs"]]
        below = [d - f for d, f in zip(dense, losses, strict=True)]
        assert design["val_loss_below_dense_per_seed"] == below
    # every design keeps the dense model's active expert width (top_k * d_expert + shared)
    active = {name: d["active_parameters"] for name, d in designs.items()}
    assert max(active.values()) - min(active.values()) <= 4 * 8 * 64  # routers: layers x E x D
    assert designs["hash-top1-wide"]["parameters"] > designs["top2"]["parameters"]


def test_moe_designs_needs_a_dense_design(tmp_path):
    bench = load_benchmark("moe_designs")
    spec = tmp_path / "designs.json"
    spec.write_text('{"top1": ["--model.moe.top_k=1"]}')
    args = bench.parse_args(["--preset", "tiny", "--designs", str(spec)])
    with pytest.raises(SystemExit, match='"dense" entry'):
        bench.designs(args, bench.base_config(args))
    args = bench.parse_args(["--preset", "tiny", "--only", "dense,hash-top2"])
    assert list(bench.designs(args, bench.base_config(args))) == ["dense", "hash-top2"]
    args = bench.parse_args(["--preset", "tiny", "--only", "dense,top9"])
    with pytest.raises(SystemExit, match="unknown designs"):
        bench.designs(args, bench.base_config(args))


@pytest.mark.slow
def test_decode_benchmark_quick(tmp_path):
    pytest.importorskip("transformers")
    result = load_benchmark("decode").main(["--quick", "--out", str(tmp_path / "decode.json")])
    assert (tmp_path / "decode.json").exists()
    assert result["model"]["kernels"]
    bw = result["bandwidth"]
    assert bw["bytes_per_token"] > 0 and bw["stream_gb_s"]["median"] > 0
    assert {"torch", "moekit", "numpy"} == set(bw["gemv"])
    for batch in ("1", "8"):
        runs = result["batches"][batch]
        assert runs["same_tokens"], batch  # kernels on, off, and transformers agree
        for name in ("moekit", "moekit_without_kernels", "transformers_eager"):
            assert runs[name]["decode_tokens_per_s"] > 0 and runs[name]["prefill_s"] > 0
    assert "moekit decodes" in result["note"]
