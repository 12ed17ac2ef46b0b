"""Every layout of issue 18 on 4 gloo processes against one process on the same global batches:
losses, gradient norms, every gradient, the checkpoint after a step (weights and SGD momentum; the
trainer's AdamW through the same code in tests/test_distributed_train.py),
the updated weights and the aux-loss-free expert biases; resuming a single-process checkpoint
under each layout; an upcycled model with frozen parts under FSDP2. All jobs run one after
another in one spawn of 4 processes (tests/layout_cases.py)."""

from __future__ import annotations

import pytest
import torch
from tests.distributed_cases import spawn
from tests.layout_cases import LAYOUTS, MODEL, Job, layout_jobs, one_process

from moekit.config import ModelConfig, ParallelConfig, RunConfig, TrainConfig
from moekit.model import MoETransformer
from moekit.train.upcycle import upcycle_config, upcycle_model

# Float32 rounding: the same sums in another order.
TOL = {"rtol": 1e-4, "atol": 1e-6}
UPCYCLED = upcycle_config(MODEL.replace(moe=None, first_dense=0, mtp_depth=0), 8, 2)
FROZEN = ("attention", "router")
# FSDP2 with tensor parallelism's replicated norms; sequence parallelism with MoE layers that
# have no shared experts (their output is cut, not reduce-scattered)
UPCYCLE_LAYOUTS = ("dp_shard2_tp2_sp",)
# Resuming cuts the optimizer state as each kind of piece is cut: FSDP2 shards with expert
# slices (dp_shard4_ep4), FSDP2 over tensor-parallel DTensors and hidden-split experts
# (dp_shard2_tp2); ep4 resumes through DDP in tests/test_distributed_train.py's runs. (Fewer
# jobs: CI's time.)
RESUME_LAYOUTS = ("dp_shard4_ep4", "dp_shard2_tp2")
BF16_LAYOUT = {"dp_shard": 2, "tp": 2, "param_dtype": "bfloat16"}


def upcycled_start() -> dict:
    torch.manual_seed(0)
    dense = MoETransformer(UPCYCLED.replace(moe=None))
    return {"model": upcycle_model(dense, UPCYCLED, noise=0.01).state_dict()}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """(reference, layout result) for each job name."""
    fresh = {name: Job(layout) for name, layout in LAYOUTS.items()}
    saved = one_process(Job({}))["saved"]
    resumed = {
        f"resume-{n}": Job(LAYOUTS[n], start=saved, first=1, record=False) for n in RESUME_LAYOUTS
    }
    start = upcycled_start()
    upcycled = {
        f"upcycled-{n}": Job(LAYOUTS[n], start=start, freeze=FROZEN, model=UPCYCLED)
        for n in UPCYCLE_LAYOUTS
    }
    bf16 = {"bf16": Job(BF16_LAYOUT)}
    jobs = fresh | resumed | upcycled | bf16
    jobs_file = tmp_path_factory.mktemp("layouts") / "jobs.pt"
    torch.save(list(jobs.values()), jobs_file)
    got = spawn(layout_jobs, 4, str(jobs_file), timeout=240)[0]
    references: dict[tuple, dict] = {}
    out = {}
    for (name, job), result in zip(jobs.items(), got, strict=True):
        key = (job.first, job.freeze, job.model is UPCYCLED)
        if key not in references:
            references[key] = one_process(Job({}, job.start, job.first, job.freeze, job.model))
        out[name] = (references[key], result)
    return out


def named(name: str):
    return lambda message: f"{name}: {message}"


def assert_same_run(ref: dict, got: dict) -> None:
    for r, g in zip(ref["steps"], got["steps"], strict=True):
        torch.testing.assert_close(g["loss"], r["loss"], **TOL)
        torch.testing.assert_close(g["norm"], r["norm"], **TOL)
    recorded = ref["grads"] if got["grads"] else {}  # resumed runs record no gradients
    for name, grad in recorded.items():
        torch.testing.assert_close(got["grads"][name], grad, **TOL, msg=named(name))
    assert got["final"].keys() == ref["final"].keys()
    for name, value in ref["final"].items():
        torch.testing.assert_close(got["final"][name], value, **TOL, msg=named(name))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_layout_trains_as_one_process(results, layout) -> None:
    ref, got = results[layout]
    assert got["grads"].keys() == ref["grads"].keys()
    assert_same_run(ref, got)
    biases = [k for k in ref["final"] if k.endswith("router.expert_bias")]
    assert biases and any(ref["final"][k].abs().sum() > 0 for k in biases)  # some moved


@pytest.mark.parametrize("layout", LAYOUTS)
def test_its_checkpoint_is_the_single_process_one(results, layout) -> None:
    ref, got = results[layout]
    assert got["saved"]["model"].keys() == ref["saved"]["model"].keys()
    for name, value in ref["saved"]["model"].items():
        torch.testing.assert_close(got["saved"]["model"][name], value, **TOL, msg=name)
    ref_state, got_state = ref["saved"]["optim"]["state"], got["saved"]["optim"]["state"]
    assert got_state.keys() == ref_state.keys()
    for index, entries in ref_state.items():
        for key, value in entries.items():
            torch.testing.assert_close(got_state[index][key], value, **TOL, msg=f"{index}.{key}")


@pytest.mark.parametrize("layout", RESUME_LAYOUTS)
def test_a_single_process_checkpoint_resumes_under_it(results, layout) -> None:
    ref, got = results[f"resume-{layout}"]
    assert_same_run(ref, got)


@pytest.mark.parametrize("layout", UPCYCLE_LAYOUTS)
def test_an_upcycled_model_with_frozen_parts_trains_under_fsdp(results, layout) -> None:
    ref, got = results[f"upcycled-{layout}"]
    assert_same_run(ref, got)
    assert not any(".attn." in k or ".router." in k for k in got["grads"])
    assert any(".experts." in k for k in got["grads"])


def test_layouts_are_checked_before_any_process_is_needed() -> None:
    with pytest.raises(ValueError, match=r"parallel.ep=3 is invalid: .* must divide"):
        ParallelConfig(ep=3).sizes(4)
    with pytest.raises(ValueError, match=r"parallel.tp=3 is invalid: must divide model.n_heads"):
        ParallelConfig(tp=3).check_model(MODEL)
    with pytest.raises(ValueError, match=r"launch 2"):
        ParallelConfig(dp_replicate=1, dp_shard=2).sizes(4)
    with pytest.raises(ValueError, match=r"bfloat16 parameters need the FSDP2 path"):
        ParallelConfig(ep=2, param_dtype="bfloat16").sizes(2)
    split = ParallelConfig(tp=4, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"train.seq_len=10 is invalid: .* parallel.tp \(4\)"):
        RunConfig(model=MODEL, train=TrainConfig(seq_len=10), parallel=split)
    with pytest.raises(ValueError, match=r"use 8 or 12, or parallel.sequence_parallel=false"):
        split.check_seq_len(10)
    ParallelConfig(tp=4).check_seq_len(10)  # without sequence parallelism any length splits
    deepseek = ModelConfig.preset("deepseek-v3")  # MLA: its latent attention is not split
    with pytest.raises(ValueError, match=r"parallel.tp=2 is invalid: .*not MLA yet"):
        ParallelConfig(tp=2).check_model(deepseek)
    with pytest.raises(ValueError, match=r"qk_norm='full' normalises across every head"):
        ParallelConfig(tp=2).check_model(ModelConfig.preset("olmoe-1b-7b"))


def test_bfloat16_parameters_train_as_float32_within_bfloat16_rounding(results) -> None:
    """FSDP2's mixed precision (bf16 gathers and compute, float32 master weights and gradient
    reduction): the losses and gradients of one float32 process, to bf16's 8 bits."""
    ref, got = results["bf16"]
    for r, g in zip(ref["steps"], got["steps"], strict=True):
        torch.testing.assert_close(g["loss"], r["loss"], rtol=1e-2, atol=0.0)
    for name, grad in ref["grads"].items():
        assert got["grads"][name].dtype == torch.float32, name  # reduced in float32
        error = (got["grads"][name] - grad).norm() / grad.norm().clamp_min(1e-12)
        assert error < 0.15, (name, float(error))  # a wrong layout is off by ~1
    # not float32 in disguise: bf16 rounding shows
    assert any((got["grads"][n] - g).abs().max() > 1e-6 for n, g in ref["grads"].items())
