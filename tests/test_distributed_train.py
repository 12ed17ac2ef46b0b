"""`torchrun -m moekit train --parallel.ep=2` trains as one process does, writes single-process
checkpoints that any process count resumes and `moekit convert` reads, and fails clearly when a
process dies, hangs, or was started with another config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed_cases import spawn, train_worker
from tests.run_cases import tiny_run

from moekit.config import (
    CheckpointConfig,
    EvalConfig,
    ParallelConfig,
    RunConfig,
)
from moekit.train import train
from moekit.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def run_config(work_dir: Path, **train_fields: object) -> RunConfig:
    """The tiny run as 6 steps of 2 micro-batches of 4 sequences of 32, checkpoints at 3 and 6."""
    settings: dict = dict(
        steps=6,
        batch_size=4,
        grad_accum=2,
        seq_len=32,
        eval=EvalConfig(every=3, batches=1),
        checkpoint=CheckpointConfig(every=3, keep=3),
    )
    settings.update(train_fields)
    return tiny_run(work_dir, **settings).replace(
        parallel=ParallelConfig(backend="gloo", timeout_s=60)
    )


def curve(run_dir: Path) -> list[tuple[str, int, float]]:
    return [
        (r["kind"], r["step"], r["loss"] if r["kind"] == "train" else r["val_loss"])
        for r in read_metrics(run_dir / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same run on one process, and on two launched by torchrun with
    --parallel.dp_shard=2 --parallel.ep=2 (FSDP2 over both processes, experts split between
    them; the trainer's AdamW, gradient accumulation, checkpoints)."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = run_config(tmp)
    train(cfg, tmp / "single")  # also fills the token cache the two processes read
    (tmp / "run.json").write_text(cfg.to_json())
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "moekit",
        "train",
        str(tmp / "run.json"),
        "--out",
        str(tmp / "ep2"),
        "--parallel.dp_shard=2",
        "--parallel.ep=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    # one process prints the config and the result (each printed them)
    assert done.stdout.count("resolved config:") == done.stdout.count("report: ") == 1, done.stdout
    return {"single": tmp / "single", "ep2": tmp / "ep2", "tmp": tmp}


def test_torchrun_two_processes_have_the_loss_curve_of_one(runs) -> None:
    single, ep2 = curve(runs["single"]), curve(runs["ep2"])
    assert [(kind, step) for kind, step, _ in ep2] == [(kind, step) for kind, step, _ in single]
    for (kind, step, got), (_, _, want) in zip(ep2, single, strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (kind, step)


def test_logged_gradient_norms_and_expert_loads_are_those_of_one_process(runs) -> None:
    """The metrics of each logged step: the global gradient norm (clipped at 1.0 here) and each
    layer's expert counts, MaxVio and balance loss over the global batch."""
    single, ep2 = (
        [r for r in read_metrics(runs[k] / "metrics.jsonl") if r["kind"] == "train"]
        for k in ("single", "ep2")
    )
    for ours, theirs in zip(ep2, single, strict=True):
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        for mine, want in zip(ours["layers"], theirs["layers"], strict=True):
            assert mine["counts"] == want["counts"]
            assert mine["max_vio"] == pytest.approx(want["max_vio"], rel=1e-5, abs=1e-6)
            assert mine["balance_loss"] == pytest.approx(want["balance_loss"], rel=1e-5)


def test_checkpoint_files_are_those_of_one_process(runs) -> None:
    for name in ("model.safetensors", "state.safetensors"):
        ours = load_file(runs["ep2"] / "checkpoints" / "step-000006" / name)
        theirs = load_file(runs["single"] / "checkpoints" / "step-000006" / name)
        assert ours.keys() == theirs.keys()
        for key, value in theirs.items():
            assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
            if value.dtype.is_floating_point:
                torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
    trainer_json = "checkpoints/step-000006/trainer.json"
    assert (runs["ep2"] / trainer_json).read_text() == (runs["single"] / trainer_json).read_text()


def test_a_two_process_run_resumes_on_one_process(runs) -> None:
    """Resumed from the two-process checkpoint at step 3, one process continues the curve."""
    resumed = runs["tmp"] / "resumed"
    shutil.copytree(runs["ep2"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    cfg = RunConfig.from_json((resumed / "config.json").read_text())
    single_process = cfg.replace(parallel=cfg.parallel.replace(ep=1, dp_shard=1))
    train(single_process, resumed, resume=True)
    for (kind, step, got), (_, _, want) in zip(curve(resumed), curve(runs["ep2"]), strict=True):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (kind, step)


def test_convert_reads_a_two_process_checkpoint(runs) -> None:
    pytest.importorskip("transformers")
    from moekit.cli import main

    out = runs["tmp"] / "hf"
    assert (
        main(["convert", "--to-hf", str(runs["ep2"]), "--arch", "mixtral", "--out", str(out)]) == 0
    )
    assert any(out.glob("*.safetensors"))


def fault_config(tmp: Path, timeout_s: float, **layout: int) -> str:
    cfg = run_config(tmp, steps=4, eval=EvalConfig(every=0, batches=1))
    if layout.get("tp", 1) > 1:  # the tiny model's 3 heads do not split in 2
        cfg = cfg.replace(model=cfg.model.replace(n_heads=4, n_kv_heads=2))
    layout = layout or {"ep": 2}
    return cfg.replace(parallel=cfg.parallel.replace(timeout_s=timeout_s, **layout)).to_json()


@pytest.mark.parametrize(
    "layout", [{"ep": 2}, {"dp_shard": 2, "ep": 2}, {"tp": 2}], ids=["ep2", "fsdp2_ep2", "tp2"]
)
def test_a_killed_process_fails_the_other_with_a_clear_error(tmp_path, layout) -> None:
    cfg = fault_config(tmp_path, timeout_s=5, **layout)
    survivor, killed = spawn(
        train_worker, 2, cfg, str(tmp_path / "run"), ("kill", 1, 2), may_die=(1,), timeout=60
    )
    assert killed is None
    assert "rank 0: a collective operation failed while training" in survivor["error"]
    assert (
        "another process died or did not answer within parallel.timeout_s=5 s"
        in (survivor["error"])
    )


def test_a_hung_process_fails_the_other_after_the_timeout(tmp_path) -> None:
    cfg = fault_config(tmp_path, timeout_s=3)
    survivor, hung = spawn(
        train_worker, 2, cfg, str(tmp_path / "run"), ("hang", 1, 2, 6), may_die=(1,), timeout=60
    )
    assert hung is None
    assert "parallel.timeout_s=3 s" in survivor["error"]
    assert "Timed out" in survivor["error"]  # the timeout fired; no connection was lost
    assert survivor["seconds"] < 30


def test_processes_started_with_different_configs_stop_at_once(tmp_path) -> None:
    cfg = fault_config(tmp_path, timeout_s=20)
    results = spawn(train_worker, 2, cfg, str(tmp_path / "run"), ("lr", 1, 1e-3), timeout=60)
    for r in results:
        assert "different configs" in r["error"]
        assert "rank 1: train.lr=0.001 (rank 0: 0.003)" in r["error"]


def test_only_the_last_micro_batch_of_a_step_averages_gradients() -> None:
    from moekit.distributed.trainer import _SyncOnLastMicroBatch

    synced = []

    class RecordingDDP:
        require_backward_grad_sync = True

        def __call__(self, batch: int) -> int:
            synced.append(self.require_backward_grad_sync)
            return batch

    model = _SyncOnLastMicroBatch(RecordingDDP(), grad_accum=3)
    for _ in range(3):
        model(0)
    with torch.no_grad():  # an evaluation pass is not a micro-batch
        model(0)
    assert synced == [False, False, True, True]
    assert model.calls == 3


class _RecordingDDP:
    require_backward_grad_sync = True

    def __call__(self, batch: int) -> int:
        return batch


@pytest.mark.parametrize("passes", [1, 2, 4])
def test_a_step_of_another_number_of_micro_batches_than_grad_accum_is_refused(passes) -> None:
    """Too few training passes are refused after the step's micro-batches (before the update),
    one too many at once: the gradients would have been averaged at the wrong micro-batch."""
    from moekit.distributed.trainer import _SyncOnLastMicroBatch

    model = _SyncOnLastMicroBatch(_RecordingDDP(), grad_accum=3)
    expected = rf"a training step made {passes} training forward passes, not train\.grad_accum=3"
    for step in range(2):
        model.start_step()
        with pytest.raises(RuntimeError, match=expected):
            for _ in range(passes):
                model(step)
            model.check_step()


def test_each_step_counts_its_own_micro_batches() -> None:
    from moekit.distributed.trainer import MeshParallelism, _SyncOnLastMicroBatch

    one_process = SimpleNamespace(data_rank=0, data_size=1)
    parallelism = MeshParallelism(run_config(Path(".")), mesh=one_process)
    ddp = _RecordingDDP()
    parallelism.forward_model = model = _SyncOnLastMicroBatch(ddp, grad_accum=2)
    for step in range(3):
        parallelism.before_step(0, step)  # starts the step's count
        for _ in range(2):
            model(step)
        with torch.no_grad():
            model(step)  # an evaluation pass is not a micro-batch
        model.check_step()
        assert model.calls == 2 and ddp.require_backward_grad_sync
