"""The benchmark scripts run end to end on tiny shapes (their numbers are not judged here)."""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tests.run_cases import JSON_PACKAGE

from moekit import MoETransformer
from moekit.quant import kernels as quant_kernels
from moekit.quant.modules import quantize_model
from moekit.train.lockstep import design_configs, seconds_at

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
    with pytest.warns(UserWarning, match="prefetch stands down: a budget of 2 experts"):  # top_k's
        result = bench.main(["--quick", "--out", str(out)])
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    assert result["checks"]["all_bit_identical"]
    budgets = {r["budget"] for r in result["runs"]}
    assert budgets == {*bench.BUDGETS, result["model"]["top_k"]}
    assert all(0 <= r["belady_hit_rate"] <= 1 and r["tokens_per_s"] > 0 for r in result["runs"])
    peaks = result["memory"]["peak_rss_above_imports_bytes"]
    assert set(peaks) == {"all", "0.5"} and min(peaks.values()) > 0


@pytest.mark.slow
def test_prefetch_benchmark_times_each_distance_on_equal_outputs(tmp_path):
    """Each build's outputs are checked equal to the default build's before it is timed (a
    prefetch distance changes no sum); every scheme and build gets a time."""
    bench = load_benchmark("prefetch")
    best = quant_kernels.path()
    body = [] if best == "portable" else ["--body", "avx2"]  # the body AMD hosts run
    result = bench.main(["--quick", "--distances", "0", "--out", str(tmp_path / "p.json"), *body])
    assert result["kernel_body"] == (body[1] if body else "portable")  # as the library says
    assert quant_kernels.path() == best  # moekit's own library untouched: the builds are apart
    assert [r["scheme"] for r in result["results"]] == list(bench.SCHEMES)
    for row in result["results"]:
        assert set(row["us"]) == {"default", "0"} and min(row["us"].values()) > 0
        assert row["calls_each"] >= 2
    assert result["recommended"] == 0 and set(result["relative_time"]) == {"0"}
    assert json.loads((tmp_path / "p.json").read_text())["distances"] == [0]


@pytest.mark.slow
def test_kernel_ab_benchmark_times_a_commit_against_this_tree(tmp_path):
    """The kernels of HEAD (git) against this tree's, both pools, every scheme: timed, with the
    outputs checked equal first."""
    bench = load_benchmark("kernel_ab")
    result = bench.main(["--before", "HEAD", "--quick", "--out", str(tmp_path / "ab.json")])
    assert result["before"]["commit"] == bench.git("rev-parse", "HEAD").strip()
    pairs = [(pool, scheme) for pool in ("cache", "dram") for scheme in bench.SCHEMES]
    assert {(r["pool"], r["scheme"]) for r in result["results"]} == set(pairs)
    assert all(r["speedup"] > 0 and r["calls_each"] >= 2 for r in result["results"])
    assert set(result["summary"]) == {f"{pool} | {scheme}" for pool, scheme in pairs}
    with pytest.raises(SystemExit, match=r"git rev-parse .*no-such-commit"):
        bench.main(["--before", "no-such-commit", "--quick"])


def test_kernel_ab_refuses_kernels_older_than_the_api_it_calls(monkeypatch):
    bench = load_benchmark("kernel_ab")

    def old_sources(rev, dest):  # kernels without moekit_q_set_x8, as before 6e3d8ab
        (dest / "kernels.c").write_text("int moekit_q_set_path(int p) { return p; }\n")
        return dest / "kernels.c"

    monkeypatch.setattr(bench, "sources_at", old_sources)
    with pytest.raises(SystemExit, match="predates the int8-activation path"):
        bench.main(["--before", "HEAD", "--quick"])


def test_benchmark_builds_are_libraries_of_their_own():
    """Two builds of the same source and flags but names apart, and moekit's own library: three
    handles, so setting a build's body touches neither moekit's kernels nor another build."""
    bench = load_benchmark("prefetch")
    a, b = bench.build("default", None), bench.build("before", None)  # (as kernel_ab builds)
    assert len({a._handle, b._handle, quant_kernels._loaded()._handle}) == 3


def test_prefetch_benchmark_refuses_a_build_whose_outputs_differ():
    """A build whose product differs from the default's in one number is an error, not a time."""
    bench = load_benchmark("prefetch")
    real = bench.build("default", None)

    class OffByOne:  # the real kernel, then its first output nudged
        def moekit_q_linear(self, *args):
            status = real.moekit_q_linear(*args)
            ctypes.c_float.from_address(args[-1]).value += 1.0
            return status

    with pytest.raises(AssertionError, match="differ from the default"):
        bench.measure({"default": real, "1": OffByOne()}, "int4", 64, 64, 2**16, 1)


def test_prefetch_verdict_takes_the_smallest_distance_within_the_tie():
    bench = load_benchmark("prefetch")
    rows = [{"us": {"default": 1.0, "1024": 1.3, "4096": 1.004, "8192": 1.0}}]
    relative, recommended = bench.verdict(rows, [1024, 4096, 8192])
    assert recommended == 4096 and relative["1024"] == pytest.approx(1.3)
    assert bench.verdict(rows, [1024, 8192])[1] == 8192


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
    assert all(0 < r <= 1 for r in designs["dense"]["step_ratio_per_seed"])  # reaches its final
    assert result["eval_every"] == 2 and result["base"]["train"]["steps"] == 6
    for name, design in designs.items():
        losses = design["final_val_loss_per_seed"]
        assert len(losses) == 2 and losses[0] != losses[1], name  # two seeds, two runs
        dense = [runs["dense"]["final_val_loss"] for runs in result["runs"]]
        below = [d - f for d, f in zip(dense, losses, strict=True)]
        assert design["val_loss_below_dense_per_seed"] == below
    assert designs["hash-top1-wide"]["parameters"] > designs["top2"]["parameters"]


def _run(final: float, curve: list[tuple[int, float]]) -> dict:
    return {"final_val_loss": final, "val_curve": [list(p) for p in curve], "tokens_per_s": 1.0,
            "parameters": 1, "active_parameters": 1, "final_val_bpb": final,
            "train_seconds": 40.0, "seconds_curve": [[40, 40.0]]}  # fmt: skip


def test_moe_designs_measures_each_seed_against_its_own_dense_run():
    bench = load_benchmark("moe_designs")
    moe_curve = [(10, 5.0), (20, 4.5), (30, 4.2), (40, 4.0)]
    per_seed = [  # seed 0's dense ends at 4.5, seed 1's at 4.1: the same MoE curve reaches them
        {"dense": _run(4.5, [(40, 4.5)]), "moe": _run(4.0, moe_curve)},  # at step 20
        {"dense": _run(4.1, [(40, 4.1)]), "moe": _run(4.0, moe_curve)},  # at step 40
    ]
    table = bench.summarise(per_seed, steps=40)
    assert table["moe"]["step_ratio_per_seed"] == [0.5, 1.0]
    assert table["moe"]["step_ratio_mean"] == 0.75
    assert table["moe"]["val_loss_below_dense_per_seed"] == pytest.approx([0.5, 0.1])
    per_seed[1]["moe"] = _run(4.3, [(40, 4.3)])  # never reaches seed 1's dense: no mean
    assert bench.summarise(per_seed, steps=40)["moe"]["step_ratio_per_seed"] == [0.5, None]
    assert bench.summarise(per_seed, steps=40)["moe"]["step_ratio_mean"] is None


def test_moe_designs_keep_the_active_width_of_a_base_with_a_shared_expert():
    bench = load_benchmark("moe_designs")
    args = bench.parse_args(["--preset", "tiny", "--set=--model.moe.n_shared_experts=1"])
    base = bench.base_config(args)
    moe = base.model.moe
    assert moe.shared_width > 0  # the active width A = top_k * d_expert + the shared width
    designs = bench.designs(args, base)
    configs = bench.check_widths(design_configs(base, designs))  # every design's width is A
    assert configs["dense"].model.d_ff == moe.top_k * moe.d_expert + moe.shared_width
    assert configs["top2"].model.moe.shared_width == 0
    wide = f"--model.moe.d_expert={moe.d_expert}"  # a top-2 design of twice the width
    designs["top2"] = [
        wide if o.startswith("--model.moe.d_expert=") else o for o in designs["top2"]
    ]
    with pytest.raises(
        SystemExit, match=f"'top2' has an active expert width of {2 * moe.d_expert}"
    ):
        bench.check_widths(design_configs(base, designs))


def test_moe_designs_needs_a_dense_design(tmp_path):
    bench = load_benchmark("moe_designs")
    spec = tmp_path / "designs.json"
    spec.write_text('{"top1": ["--model.moe.top_k=1"]}')
    args = bench.parse_args(["--preset", "tiny", "--designs", str(spec)])
    with pytest.raises(SystemExit, match='"dense" entry'):
        bench.designs(args, bench.base_config(args))
    args = bench.parse_args(["--preset", "tiny", "--only", "hash-top2,dense"])  # dense first
    assert list(bench.designs(args, bench.base_config(args))) == ["dense", "hash-top2"]
    args = bench.parse_args(["--preset", "tiny", "--only", "dense,top9"])
    with pytest.raises(SystemExit, match="unknown designs"):
        bench.designs(args, bench.base_config(args))


def test_decode_llamacpp_body_build_and_arch_flags(tmp_path, monkeypatch, capsys):
    """--body runs moekit's side of --llamacpp on that quantized-kernel body, and only it;
    --llamacpp-build and --arch reach the comparison, --arch deepseek_v3 writing its own results
    by default (llama.cpp itself is stubbed: a bench-only dependency); each refused without
    --llamacpp."""
    before = quant_kernels.path()
    runs = [b for b in quant_kernels.PATHS if quant_kernels.cannot_run(b) is None]
    other = next((b for b in runs if b != before), None)
    bench = load_benchmark("decode")
    seen = []

    def section(quick, converter, build, arch):
        seen.append((quant_kernels.path(), build, arch))
        return {"benchmark": "decode_llamacpp"}

    monkeypatch.setattr(bench, "llamacpp_section", section)
    monkeypatch.setattr(bench, "LLAMACPP_RESULTS", tmp_path / "decode_llamacpp.json")
    out = str(tmp_path / "l.json")
    bench.main(["--llamacpp", "--arch", "deepseek_v3"])
    bench.main(["--llamacpp", "--llamacpp-build", "AVX2 only", "--out", out])
    assert seen == [(before, bench.LLAMACPP_BUILD, "deepseek_v3"), (before, "AVX2 only", "mixtral")]
    assert (tmp_path / "decode_llamacpp_deepseek_v3.json").is_file()
    for alone in (["--arch", "deepseek_v3"], ["--llamacpp-build", "x"]):  # without --llamacpp
        with pytest.raises(SystemExit) as exit_:
            bench.main([*alone, "--out", out])
        assert exit_.value.code == 2
        assert "are settings of the --llamacpp run" in capsys.readouterr().err
    if other is None:
        pytest.skip("this CPU runs only one body: --body switches nothing here")
    bench.main(["--llamacpp", "--body", other, "--out", out])
    assert seen[-1][0] == other and quant_kernels.path() == before  # restored
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--body", other, "--out", out])
    assert exit_.value.code == 2 and "are settings of the --llamacpp run" in capsys.readouterr().err


def test_decode_deepseek_v3_layout_is_deepseek_v3s_at_decode_pys_widths():
    """--arch deepseek_v3's model: latent attention with a low-rank query (llama.cpp's deepseek2
    needs one below 27 layers), a dense first layer, sigmoid routing with a shared expert, the
    widths of the default model; every quantized contender's shapes quantizable."""
    bench = load_benchmark("decode")
    plain, latent = bench.model_config(False), bench.model_config(False, "deepseek_v3")
    assert (latent.d_model, latent.n_layers, latent.vocab_size) == (
        plain.d_model, plain.n_layers, plain.vocab_size)  # fmt: skip
    assert latent.mla.q_lora_rank and list(latent.moe_layer_indices) == list(range(1, 8))
    assert (latent.moe.score, latent.moe.n_shared_experts) == ("sigmoid", 1)
    with torch.device("meta"):
        model = MoETransformer(latent)
    for config in bench.MOEKIT_QUANTIZED.values():
        quantize_model(copy.deepcopy(model), config)  # (raises on a shape it cannot store)


def test_kernel_rows_benchmark_quick(tmp_path):
    """Every scheme's table has both row counts on both shapes, and its recommendation is a row
    count at which every ratio up to it is at least 1 (or one pass)."""
    if not quant_kernels.available():
        pytest.skip("the quantized kernels are not built here")
    result = load_benchmark("kernel_rows").main(
        ["--quick", "--repeats", "2", "--out", str(tmp_path / "r.json")]
    )
    assert (tmp_path / "r.json").exists() and result["body"] == quant_kernels.path()
    for entry in result["schemes"].values():
        rows = [R for R in (17, 40) if entry["recommended"] >= R]
        assert entry["recommended"] in (16, *rows)
        for table in entry["table"].values():
            assert set(table) == {"17", "40"} and all(t["ratio"] > 0 for t in table.values())
            assert all(table[str(R)]["ratio"] >= 1 for R in rows)
        beyond = [R for R in (17, 40) if entry["recommended"] < R][:1]  # the first it refused
        assert all(any(t[str(R)]["ratio"] < 1 for t in entry["table"].values()) for R in beyond)


def test_kernel_rows_recommends_up_to_the_first_row_count_a_shape_loses() -> None:
    """The largest row count before the first at which any shape's ratio drops under 1 (a win
    after a loss does not count); one pass if the first already loses."""
    bench = load_benchmark("kernel_rows")

    def table(*ratios):
        return {str(R): {"ratio": r} for R, r in zip((17, 32, 64), ratios, strict=True)}

    tables = {"a": table(2.0, 1.5, 1.2), "b": table(1.8, 0.9, 1.1)}
    assert bench.recommended(tables, ["a", "b"], (17, 32, 64)) == 17
    assert bench.recommended(tables, ["a"], (17, 32, 64)) == 64
    assert bench.recommended({"c": table(0.5, 2.0, 2.0)}, ["c"], (17, 32, 64)) == 16


@pytest.mark.slow
def test_prefill_benchmark_quick(tmp_path):
    """Both trees (HEAD's checked out into a worktree, removed after) time every length in
    alternating fresh processes and agree on the last logits; `logits_agree` refuses a moved
    logit and another best token, and allows a near-tie."""
    bench = load_benchmark("prefill")
    args = ["--quick", "--lengths", "3", "20", "--rounds", "1", "--before", "HEAD",
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "p.json")]  # fmt: skip
    result = bench.main(args)
    assert (tmp_path / "p.json").exists() and result["logits_agree"]
    before, this = result["runs"]
    assert before.startswith("before (") and this == "this tree"
    for runs in result["runs"].values():
        assert len(runs) == 1 and all(r[S]["tokens_per_s"] > 0 for r in runs for S in ("3", "20"))
    assert set(result["speedup"]) == {"3", "20"}
    run = {"top_ids": [5, 3, 9, 1, 2, 4, 6, 7], "top_logits": [10.0, 9.0, 8.0, 7, 6, 5, 4, 3]}
    assert bench.logits_agree(run, run)
    moved = {**run, "top_logits": [10.0, 9.0, 8.0, 7, 6, 5, 4, 2.0]}  # 1.0 > 5% of 10
    assert not bench.logits_agree(run, moved)
    swapped = {**run, "top_ids": [3, 5, 9, 1, 2, 4, 6, 7]}  # another best, by a clear margin
    assert not bench.logits_agree(run, swapped)
    near = {"top_ids": [3, 5, 9, 1, 2, 4, 6, 7], "top_logits": [10.0, 9.8, 8, 7, 6, 5, 4, 3]}
    assert bench.logits_agree({**near, "top_ids": [5, 3, 9, 1, 2, 4, 6, 7]}, near)  # a near-tie
    from kernel_ab import git

    worktrees = git("worktree", "list")
    assert "prefill-before-" not in worktrees  # removed
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--before", "no-such-rev", "--work", str(tmp_path / "work")])


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
    spec = result["speculative"]  # a briefly trained MTP model, drafting 1 and 2 tokens
    assert spec["training"]["steps"] > 0 and spec["training"]["final_logged"]["mtp_loss_1"] > 0
    assert spec["all_same_tokens"], spec["same_tokens"]  # drafting changes no greedy token
    assert {"moekit", "moekit_mtp_1", "moekit_mtp_2"} <= set(spec["same_tokens"])
    for n, d in spec["draft_tokens"].items():
        assert len(d["acceptance_by_position"]) == int(n)
        assert 0 <= d["acceptance_first_position"] <= 1
        assert 1 <= d["mean_accepted_length"] <= int(n) + 1
        assert d["speedup_vs_plain"] > 0 and d["bound_speedup"] == d["mean_accepted_length"]
        assert d["cost_model_speedup"] > 0 and d["in_run_seconds"]["draft_step_s"] > 0
    training = spec["training"]  # then the head alone, on the frozen model's predictions
    assert (
        training["head_distillation_steps"] > 0 and training["run_dir"] != training["joint_run_dir"]
    )
    # the second stage's loss is a KL from the model's predictions, far below a cross-entropy
    # against the text (it would be one if mtp_target were not "model")
    kl = training["final_logged_head_distillation"]["mtp_loss_1"]
    assert 0 <= kl < 0.5 * training["final_logged"]["mtp_loss_1"]
    heads = spec["teacher_forced_first_draft_acceptance"]
    assert set(heads) == {"trained_with_the_model", "distilled"}
    assert all(0 <= a <= 1 for head in heads.values() for a in head.values())
    # in [0, 1] by construction: that the two heads' figures differ shows each was measured
    assert heads["distilled"]["sampled"] != heads["trained_with_the_model"]["sampled"]
    sampled = spec["sampled"]  # temperature 0.8, on 2 prompts
    assert sampled["prompts"] == len(sampled["speedup_by_prompt"]) == 2
    rate = sampled["decode_tokens_per_s"]
    for n, d in sampled["draft_tokens"].items():
        assert len(d["acceptance_by_position"]) == int(n)
        assert all(0 <= a <= 1 for a in d["acceptance_by_position"])
        assert d["speedup_vs_plain"] == pytest.approx(rate[f"moekit_mtp_{n}"] / rate["moekit"])
    speedups = [d["speedup_vs_plain"] for d in sampled["draft_tokens"].values()]
    assert spec["checks"]["sampled_best_speedup_vs_plain"] == max(speedups)
    # transformers' generate(use_mtp=True) on the same weights, or why it could not run
    assert ("transformers_eager_use_mtp" in spec) == spec["transformers_use_mtp"].startswith("ran")
    assert spec["checks"]["best_draft_tokens"] in (1, 2)


@pytest.mark.slow
def test_moe_scaling_sizes_each_budget_and_measures_steps_and_time(tmp_path):
    bench = load_benchmark("moe_scaling")
    out = tmp_path / "scaling.json"
    # 32 x 32 tokens a step: budgets 1 and 10 train widths 16 and 8 for 12 and 40 steps (about
    # the least compute, 1e8, at which the larger budget's model is the narrower)
    small = ["--train.data.tokenizer=bytes", "--model.vocab_size=257", "--train.batch_size=32",
             "--train.seq_len=32", f"--train.data.source={JSON_PACKAGE}",
             f"--train.data.cache_dir={tmp_path / 'cache'}", "--train.eval.batches=1"]  # fmt: skip
    result = bench.main(["--compute", "1e8", "--budgets", "1,10", "--seeds", "2", "--evals", "2",
                         *(f"--set={o}" for o in small), "--out", str(out)])  # fmt: skip
    assert out.exists() and out.with_suffix(".png").stat().st_size > 0
    sizes = [p["size"] for p in result["points"]]
    assert [s["budget"] for s in sizes] == [1, 10]
    for s in sizes:  # the steps give the budget's tokens per active parameter
        assert s["steps"] * result["tokens_per_step"] / s["active_parameters"] == pytest.approx(
            s["budget"], rel=0.05
        )
    assert sizes[0]["d_model"] > sizes[1]["d_model"]  # a larger budget trains a smaller model
    rows = {(r["budget"], r["design"]): r for r in result["summary"]}
    assert set(rows) == {(b, d) for b in (1, 10) for d in bench.designs(8)}
    dense = rows[(10, "dense")]
    assert dense["step_ratio_per_seed"] == [1.0, 1.0] and dense["time_ratio_per_seed"] == [1, 1]
    for point in result["points"]:
        losses = [s["designs"]["fine-grained"]["final_val_loss"] for s in point["seeds"]]
        assert losses[0] != losses[1]  # two seeds, two runs
        for seed in point["seeds"]:
            for name, d in seed["designs"].items():
                assert (d["step_ratio"] is None) == (d["time_ratio"] is None), name
                if d["step_ratio"] is not None:  # the MoE's seconds to that step, over dense's
                    run, steps = seed["runs"][name], point["size"]["steps"]
                    seconds = seconds_at(run, d["step_ratio"] * steps)
                    dense_seconds = seed["runs"]["dense"]["train_seconds"]
                    assert d["time_ratio"] == pytest.approx(seconds / dense_seconds)
    # budgets and seeds run apart (two files) join into the same study; a seed twice is refused
    study = {key: value for key, value in result.items() if key != "summary"}
    low, high = result["points"]
    parts = [tmp_path / "part0.json", tmp_path / "part1.json"]
    parts[0].write_text(json.dumps(study | {"points": [low, high | {"seeds": high["seeds"][:1]}]}))
    parts[1].write_text(json.dumps(study | {"points": [high | {"seeds": high["seeds"][1:]}]}))
    joined = bench.main(["--merge", *map(str, parts), "--out", str(tmp_path / "joined.json")])
    assert joined["summary"] == json.loads(json.dumps(result["summary"]))
    assert [(p["budgets"], p["seeds"]) for p in joined["parts"]] == [([1, 10], [0, 1]), ([10], [1])]
    assert (tmp_path / "joined.png").stat().st_size > 0
    # a joined study joins again, bringing its parts; a base that differs only where every point
    # sets its own value (here the base's width and d_ff) is the same study, another lr is not
    resized = json.loads(json.dumps(study))
    for field in (resized["base"]["model"], resized["base"]["model"]["moe"]):
        field["d_model"] += 8
    resized["base"]["model"]["d_ff"] += 8
    files = {name: tmp_path / f"{name}.json" for name in ("a", "b", "c", "ab")}
    files["a"].write_text(json.dumps(study | {"points": [low]}))
    files["b"].write_text(json.dumps(study | {"points": [high | {"seeds": high["seeds"][:1]}]}))
    files["c"].write_text(json.dumps(resized | {"points": [high | {"seeds": high["seeds"][1:]}]}))
    bench.main(["--merge", str(files["a"]), str(files["b"]), "--out", str(files["ab"])])
    again = bench.main(["--merge", str(files["ab"]), str(files["c"]),
                        "--out", str(tmp_path / "again.json")])  # fmt: skip
    assert again["summary"] == joined["summary"]
    assert [p["file"] for p in again["parts"]] == ["a.json", "b.json", "c.json"]
    resized["base"]["train"]["lr"] *= 2
    files["c"].write_text(json.dumps(resized | {"points": [high | {"seeds": high["seeds"][1:]}]}))
    with pytest.raises(SystemExit, match="is not the same study"):
        bench.main(["--merge", str(files["a"]), str(files["c"]), "--out", str(tmp_path / "3.json")])
    with pytest.raises(SystemExit, match="budget 10 with the same seed twice"):
        bench.main(["--merge", str(parts[1]), str(parts[1]), "--out", str(tmp_path / "2.json")])
    (tmp_path / "other.json").write_text('{"benchmark": "moe_designs"}')
    for path, said in (("joined.png", "cannot read"), ("other.json", "not a moe_scaling.py")):
        with pytest.raises(SystemExit, match=said):
            bench.main(["--merge", str(tmp_path / path), "--out", str(tmp_path / "x.json")])


def test_train_step_profile_times_and_profiles_every_design(tmp_path):
    bench = load_benchmark("train_step_profile")
    out = tmp_path / "profile.json"
    result = bench.main(["--width", "16", "--rounds", "2", "--profiled", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    names = set(load_benchmark("moe_scaling").designs(16))
    assert set(result["ms_per_step"]) == set(result["profiled_ms_per_step"]) == names
    assert result["throughput_vs_dense"]["dense"] == 1.0
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    ops = result["ops_ms_per_step"]
    # the ops are those whose time most separates fine-grained from dense: routing's top-k over
    # 64 experts always among them (aten::mm's gap at this width is within timing noise)
    assert 0 < len(ops) <= bench.SHOWN_OPS and {"aten::topk", "moekit::topk_ids"} & set(ops)
    assert all(set(row) == names for row in ops.values())
    gaps = [row["fine-grained"] - row["dense"] for row in ops.values()]
    assert gaps == sorted(gaps, reverse=True)  # the fine-grained design's extra time first


@pytest.mark.slow
def test_shared_experts_benchmark_quick(tmp_path):
    """This tree's run (a fresh process) times every scheme at batch 1 and 8, greedy and on a
    fixed sequence; the summary's medians, speedups and agreement read two trees' rounds."""
    bench = load_benchmark("shared_experts")
    result = bench.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "s.json")])
    assert (tmp_path / "s.json").exists() and result["step_logits_agree"]
    (run,) = result["runs"]["this tree"]
    figures = {"b1_greedy", "b1_fixed_sequence", "b8_greedy", "b8_fixed_sequence"}
    assert set(run) == set(bench.SCHEMES) and all(
        set(row) == figures and min(row.values()) > 0 for row in run.values()
    )
    assert result["greedy_tokens_agree_b8"] == dict.fromkeys(bench.SCHEMES, 1.0)  # (itself)
    one = {s: {**dict.fromkeys(figures, 10.0), "step_logits": [1.0, -2.0],
               "b8_greedy_tokens": [[1, 2], [3, 4]]} for s in bench.SCHEMES}  # fmt: skip
    two = {s: {**r, "b1_greedy": 25.0, "step_logits": [1.0, -2.0001]} for s, r in one.items()}
    summary = bench.summarise({"before": [one], "after": [two]})
    assert summary["speedup"]["int4"]["b1_greedy"] == 2.5
    assert summary["speedup"]["int4"]["b8_greedy"] == 1.0 and summary["step_logits_agree"]
    moved = {s: {**r, "step_logits": [1.0, -2.01]} for s, r in one.items()}  # 0.005 > 1e-4
    assert not bench.summarise({"before": [one], "after": [moved]})["step_logits_agree"]
    parted = {s: {**r, "b8_greedy_tokens": [[1, 2], [3, 5]]} for s, r in one.items()}
    assert bench.summarise({"before": [one], "after": [parted]})["greedy_tokens_agree_b8"] == (
        dict.fromkeys(bench.SCHEMES, 0.75)
    )


@pytest.mark.slow
def test_latent_attention_benchmark_quick(tmp_path):
    """Both contenders at every context and weights, timed, with the same last logits."""
    bench = load_benchmark("latent_attention")
    args = ["--quick", "--contexts", "4", "40", "--steps", "3", "--rounds", "1"]
    result = bench.main([*args, "--out", str(tmp_path / "l.json")])
    assert (tmp_path / "l.json").exists() and result["logits_agree"]
    assert set(result["results"]) == {"float32", "int8"}
    for by_context in result["results"].values():
        assert set(by_context) == {"4", "40"}
        for row in by_context.values():
            assert min(row["tokens_per_s"].values()) > 0 and row["speedup"] > 0


@pytest.mark.parametrize(
    ("name", "args", "says"),
    [
        ("prefetch", ["--quick", "--out", "{tmp}"], "is a directory; give a file's path"),
        ("latent_attention", ["--quick", "--out", "{tmp}/file.txt/r.json"], "is a file, not a"),
        ("prefetch", ["--quick", "--threads", "0"], "must be an integer >= 1, not 0"),
        ("big_model", ["--quick", "--new-tokens", "0"], "must be an integer >= 1, not 0"),
        ("big_model", ["--quick", "--budget", "lots"], "expert budget 'lots' is invalid"),
        ("decode", ["--converter", "c.py"], "--converter is a setting of the --llamacpp run"),
    ],
)
def test_a_benchmark_refuses_its_arguments_before_it_measures(
    name: str, args: list[str], says: str, tmp_path: Path, capsys
) -> None:
    """--out that cannot be written, a count of 0, a budget of no form: an argparse error at
    once; they failed with a traceback after the measurement (minutes; big_model's ~30 GB)."""
    (tmp_path / "file.txt").write_text("")
    bench = load_benchmark(name)
    with pytest.raises(SystemExit) as exit_:
        bench.main([a.replace("{tmp}", str(tmp_path)) for a in args])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
