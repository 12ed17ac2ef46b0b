"""Bad input to `moekit train`, `params` and `experiment` is one line naming what is wrong and
what would be right, exit status 2, found before any run directory is made or rewritten."""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
import torch
from tests.run_cases import JSON_PACKAGE

from moekit.cli import main
from moekit.config import ParallelConfig, RunConfig
from moekit.train import train
from moekit.train.device import training_device


def data_args(cache: Path) -> list[str]:
    """The tiny preset on the json package's bytes, quietly, data cached under `cache`."""
    return [
        f"--train.data.source={JSON_PACKAGE}",
        "--train.data.tokenizer=bytes",
        f"--train.data.cache_dir={cache}",
        "--train.progress=false",
        "--train.tensorboard=false",
        "--train.eval.batches=1",
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/run: the tiny MoE trained 3 steps of 3 (finished); runs/dense: its dense twin."""
    folder = tmp_path_factory.mktemp("runs")
    args = ["train", "tiny", "--train.steps=3", *data_args(folder / "cache")]
    assert main([*args, "--out", str(folder / "run")]) == 0
    assert main([*args, "--model.moe=none", "--out", str(folder / "dense")]) == 0
    return folder


def one_line(capsys: pytest.CaptureFixture, command: str) -> str:
    """The one stderr line of a command that failed on bad input."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moekit {command}: error: "), err
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# 1. a device this machine lacks


@pytest.mark.parametrize("device", ["cuda", "cuda:5", "mps"])
def test_a_device_this_machine_lacks_is_one_line_and_makes_no_folder(
    tmp_path: Path, capsys, monkeypatch, device: str
) -> None:
    """It was AssertionError("Torch not compiled with CUDA enabled") and an empty run folder."""
    no_accelerator(monkeypatch)
    out = tmp_path / "y8"
    args = ["train", "tiny", "--train.steps=2", *data_args(tmp_path), f"--train.device={device}"]
    assert main([*args, "--out", str(out)]) == 2
    line = one_line(capsys, "train")
    assert f"train.device={device!r} is not available here" in line
    assert line.endswith("use one of auto, cpu")
    assert not out.exists()
    capsys.readouterr()
    assert main(["experiment", "balance", "--preset", "tiny", f"--train.device={device}",
                 "--out", str(out)]) == 2  # fmt: skip
    assert f"train.device={device!r}" in one_line(capsys, "experiment") and not out.exists()


def test_the_trainer_checks_the_device_before_it_makes_the_folder(tmp_path, monkeypatch) -> None:
    """`moekit.train.train` itself (the library's way in, and every arm's process)."""
    no_accelerator(monkeypatch)
    cfg = RunConfig.preset("tiny")
    cfg = cfg.replace(train=cfg.train.replace(device="cuda", steps=1))
    with pytest.raises(ValueError, match=r"train.device='cuda' is not available here"):
        train(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_devices_a_machine_has_are_named(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert training_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError) as error:
        training_device("cuda:5")
    assert str(error.value) == (
        "train.device='cuda:5' is not available here: this machine has 2 CUDA devices (cuda:0 "
        "to cuda:1); use one of auto, cpu, cuda, cuda:0, cuda:1"
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match=r"no CUDA device is visible; use one of auto, cpu$"):
        training_device("cuda")


# 2. a directory given as the config


def test_a_directory_given_as_the_config_says_what_it_is(
    runs: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """It was "preset='run' is invalid: known model presets are ..."."""
    run = runs / "run"
    for command in ("train", "params"):
        assert main([command, str(run)]) == 2
        line = one_line(capsys, command)
        assert f"{run} is a directory, not a config" in line
        assert f"moekit train --resume {run}" in line and f"{run / 'config.json'}" in line
    empty = tmp_path / "emptydir"
    empty.mkdir()
    assert main(["train", str(empty)]) == 2
    assert f"{empty} is a directory, not a config: give a preset or a JSON" in one_line(
        capsys, "train"
    )
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    assert main(["params", str(hf)]) == 2
    assert f"moekit convert --from-hf {hf}" in one_line(capsys, "params")
    (hf / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 8}')
    (hf / "model.safetensors").unlink()  # transformers' config.json alone: Hugging Face's too
    assert main(["params", str(hf)]) == 2  # it said "give its config file", refused next
    assert f"moekit convert --from-hf {hf}" in one_line(capsys, "params")
    assert main(["params", str(hf / "config.json")]) == 2  # its file: not "no field(s) [...]"
    assert "is a Hugging Face model's config, not a moekit one" in one_line(capsys, "params")
    assert main(["train", ""]) == 2
    assert "the config argument is empty" in one_line(capsys, "train")
    monkeypatch.chdir(tmp_path)  # a folder named like a preset does not hide the preset
    (tmp_path / "tiny").mkdir()
    assert main(["params", "tiny"]) == 0


# 3. every preset named


def test_an_unknown_preset_lists_every_accepted_name(capsys) -> None:
    """It listed the model presets only, not the run presets experiment and demo."""
    for args in (["train", "tinyy"], ["experiment", "balance", "--preset", "nope"]):
        assert main(args) == 2
        line = one_line(capsys, args[0])
        assert "known model presets are tiny, small," in line
        assert line.endswith("run presets (a model with training settings of its own) tiny, "
                             "experiment, demo")  # fmt: skip


# 4. an expert-parallel size that does not fit


def test_an_ep_that_does_not_fit_suggests_only_what_fits() -> None:
    """Every remedy the message names works: the ep values, the processes and dp_replicate, or
    the dp_shard sizes. (It said "launch 3 processes for ep=2" with dp_shard=3, and "launch 2
    processes for ep=3" with dp_replicate=2, dp_shard=2.)"""
    checked = 0
    for dp_shard, ep, tp, rep in itertools.product(
        range(1, 7), range(1, 9), (1, 2), (None, 1, 2, 3)
    ):
        parallel = ParallelConfig(dp_replicate=rep, dp_shard=dp_shard, ep=ep, tp=tp)
        world = parallel.min_world_size()
        try:
            parallel.sizes(world)
            continue
        except ValueError as error:
            message = str(error)
        assert message.startswith(f"parallel.ep={ep} is invalid"), message
        checked += 1
        fits = re.search(r"here ep can be ([\d, ]+), or for", message)
        assert fits, message
        for other in map(int, fits.group(1).split(", ")):
            parallel.replace(ep=other).sizes(world)
        launch = re.search(r"launch a multiple of (\d+) processes", message)
        shards = re.search(r"make parallel.dp_shard a divisor or a multiple of \d+ \(such as "
                           r"([\d, ]+)\)", message)  # fmt: skip
        assert bool(launch) != bool(shards), message
        if launch:
            n = int(launch.group(1))
            for k in (1, 2):
                replicas = None if rep is None else k * n // (dp_shard * tp)
                parallel.replace(dp_replicate=replicas).sizes(k * n)
        else:
            for shard in map(int, shards.group(1).split(", ")):  # dp_replicate as given
                fixed = parallel.replace(dp_shard=shard)
                fixed.sizes(fixed.min_world_size())
    assert checked > 100


def test_the_audits_ep_layouts_get_an_achievable_remedy(capsys) -> None:
    assert main(["params", "tiny", "--ep", "2", "--dp-shard", "3"]) == 2
    line = one_line(capsys, "params")
    assert "launch" not in line
    assert line.endswith("or for ep=2 make parallel.dp_shard a divisor or a multiple of 2 "
                         "(such as 1, 2, 4)")  # fmt: skip
    assert main(["params", "tiny", "--ep", "3", "--dp-replicate", "2", "--dp-shard", "2"]) == 2
    assert "launch" not in one_line(capsys, "params")
    assert main(["params", "tiny", "--ep", "6", "--dp-replicate", "2", "--dp-shard", "2"]) == 2
    line = one_line(capsys, "params")
    assert line.endswith("launch a multiple of 6 processes (dp_replicate a multiple of 3)")
    assert main(["params", "tiny", "--ep", "6", "--dp-replicate", "3", "--dp-shard", "2"]) == 0


# 5, 6. resuming: the run's model, and steps left to train


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("--model.moe.n_experts=4", "model.moe.n_experts (6 in the run, 4 here)"),
        ("--model.moe=none", "model.moe (6 experts top-2 in the run, None (dense) here)"),
        ("--model.mtp_depth=1", "--train.init_from="),
    ],
)
def test_resuming_with_an_override_that_changes_the_model_names_it(
    runs: Path, capsys, override: str, expected: str
) -> None:
    """It was "model.safetensors holds the weights of another model than its run's config.json
    describes ...; restore the config.json the run was trained with"."""
    run = runs / "run"
    before = snapshot(run)
    assert main(["train", "--resume", str(run), override, "--train.steps=5"]) == 2
    line = one_line(capsys, "train")
    assert line.startswith(f"moekit train: error: {override} changes the model of {run}: ")
    assert expected in line
    assert "a resumed run keeps its model: drop it, or " in line
    assert f"moekit train {run / 'config.json'} {override}" in line
    assert snapshot(run) == before


def test_resuming_with_a_change_its_weights_still_fit_trains(runs: Path, tmp_path) -> None:
    """Capacity dispatch or another top_k on the same weights (fine-tuning a converted run with a
    capacity factor, say) resumes, as it did before the check of the model."""
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    overrides = ["--model.moe.capacity_factor=1.25", "--model.moe.top_k=1", "--train.steps=4"]
    assert main(["train", "--resume", str(run), *overrides]) == 0
    assert (run / "checkpoints" / "step-000004").is_dir()


@pytest.mark.parametrize(
    ("steps", "expected"),
    [
        ([], "is finished (step 3 of 3): nothing to train; raise --train.steps above 3"),
        (["--train.steps=2"], "is finished (step 3 of 3): nothing to train with train.steps=2"),
        (["--train.steps=3"], "is finished (step 3 of 3): nothing to train; raise"),
    ],
)
def test_resuming_a_run_with_no_step_left_is_refused(
    runs: Path, capsys, steps: list[str], expected: str
) -> None:
    """It printed "step 3: train loss n/a ... 0 tokens/s", exit 0, and rewrote config.json with
    the override's steps."""
    run = runs / "run"
    before = snapshot(run)
    assert main(["train", "--resume", str(run), *steps]) == 2
    line = one_line(capsys, "train")
    assert f"{run} {expected}" in line
    assert line.endswith(f"to continue (moekit train --resume {run} --train.steps=N)")
    assert snapshot(run) == before


def test_the_trainer_refuses_a_resume_with_no_step_left(runs: Path) -> None:
    run = runs / "run"
    cfg = RunConfig.from_file(run / "config.json", "")
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"is at step 3: nothing to train with train.steps=2;"):
        train(cfg.replace(train=cfg.train.replace(steps=2)), run, resume=True)
    assert snapshot(run) == before


# 7. an empty --out


@pytest.mark.parametrize(
    "args",
    [
        ["train", "tiny", "--out="],
        ["train", "tiny", "--out", " "],
        ["train", "--resume="],
        ["experiment", "balance", "--out="],
    ],
)
def test_an_empty_folder_argument_is_refused(tmp_path: Path, capsys, monkeypatch, args) -> None:
    """`--out=` trained into runs/tiny-DATE as if --out were not given."""
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    assert "is empty: give a path" in one_line(capsys, args[0])
    assert list(tmp_path.iterdir()) == []


# 8. a sequence longer than the model's context


def test_params_refuses_a_sequence_longer_than_the_model_takes(capsys) -> None:
    assert main(["params", "tiny", "--seq-len", "100000"]) == 2
    line = one_line(capsys, "params")
    assert line.endswith("--seq-len=100000 is invalid: must be at most the model's context, "
                         "max_seq_len (128)")  # fmt: skip
    assert main(["params", "tiny", "--seq-len", "128"]) == 0
    capsys.readouterr()
    assert main(["params", "tiny", "--tp", "3", "--parallel.sequence_parallel=true"]) == 2
    line = one_line(capsys, "params")  # 129 would pass tp, not max_seq_len
    assert "the default --seq-len=128 is invalid" in line and "use 126, or" in line


# 9. init_from a run of another model


def test_init_from_a_dense_run_into_an_moe_names_the_difference_in_a_few_words(
    runs: Path, tmp_path: Path, capsys
) -> None:
    """It printed the whole MoEConfig dict."""
    out = tmp_path / "x9"
    assert main(["train", "tiny", f"--train.init_from={runs / 'dense'}", "--out", str(out)]) == 2
    line = one_line(capsys, "train")
    assert (
        "its model differs from this run's in model.moe (None (dense) there, 6 experts top-2 "
        "here); give its settings"
    ) in line
    assert "d_model" not in line and len(line) < 400
    assert not out.exists()


def test_a_run_refused_after_its_data_is_read_leaves_no_folder(
    runs: Path, tmp_path: Path, capsys
) -> None:
    """The run folder is made once everything is read: a tokenizer that is not the source run's
    was found after the folder had been made, and left it behind empty."""
    out = tmp_path / "bpe"
    bpe = [a.replace("tokenizer=bytes", "tokenizer=bpe") for a in data_args(tmp_path)]
    args = ["train", "tiny", *bpe]
    assert main([*args, f"--train.init_from={runs / 'run'}", "--out", str(out)]) == 2
    assert "was trained with another tokenizer" in one_line(capsys, "train")
    assert not out.exists()
