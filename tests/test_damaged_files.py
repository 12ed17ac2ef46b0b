"""Every command that reads a file a user hands us (checkpoints, configs, tokenizers, indexes,
metrics) reports a damaged one as one line naming the file and what to do: exit 2, no traceback,
nothing written."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.run_cases import JSON_PACKAGE, tiny_run

from moekit.cli import main
from moekit.interop import save_hf
from moekit.loading import load
from moekit.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run with checkpoints at steps 4, 8 and 12."""
    work = tmp_path_factory.mktemp("damaged")
    train(tiny_run(work), work / "run")
    return work / "run"


@pytest.fixture(scope="module")
def hf_trained(trained: Path, tmp_path_factory) -> Path:
    """The run as a Mixtral checkpoint in several shards (with an index), with its tokenizer."""
    out = tmp_path_factory.mktemp("hf") / "hf"
    loaded = load(trained)
    shard = loaded.model.num_parameters() * 4 // 3  # a third of the float32 model: 3 shards or more
    return save_hf(loaded.model, out, "mixtral", tokenizer=loaded.tokenizer, max_shard_size=shard)


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


@pytest.fixture
def hf(hf_trained: Path, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    shutil.copytree(hf_trained, out)
    return out


def truncate(path: Path) -> None:
    """What a copy or download cut short leaves."""
    os.truncate(path, path.stat().st_size // 2)


def garbage(path: Path) -> None:
    """Bytes that are no file format at all, the file's own size."""
    size = path.stat().st_size
    path.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])


DAMAGE = {"truncated": truncate, "garbage": garbage}


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(capsys, command: str, path: Path) -> str:
    """The single stderr line of a failed command, which names `path`."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {command}: error: "), err
    assert str(path) in lines[0], err
    return lines[0]


def checkpoint_commands(run: Path, tmp_path: Path) -> dict[str, list[str]]:
    prompts, out = tmp_path / "prompts.txt", tmp_path / "o"
    prompts.write_text("def f(\n")
    return {
        "generate": ["generate", str(run), "--max_new_tokens=3"],
        "offloaded": ["generate", str(run), "--max_new_tokens=3", "--offload.budget=50%"],
        "analyze": ["analyze", str(run), "--tokens=256", "--seq_len=32"],
        "convert": ["convert", "--to-hf", str(run), "--arch", "mixtral", "--out", str(out)],
        "train": ["train", "--resume", str(run)],
        "trace": ["trace", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "o.st")],
    }


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize(
    "command", ["generate", "offloaded", "analyze", "convert", "train", "trace"]
)
def test_damaged_newest_weights_are_named_with_the_checkpoint_to_fall_back_on(
    run: Path, tmp_path: Path, capsys, command: str, damage: str
) -> None:
    weights = run / "checkpoints/step-000012/model.safetensors"
    DAMAGE[damage](weights)
    before = snapshot(run)
    args = checkpoint_commands(run, tmp_path)[command]
    assert main(args) == 2
    line = one_line_error(capsys, args[0], weights)
    assert "truncated" in line
    assert f"delete {run / 'checkpoints/step-000012'}" in line and "step-000008" in line
    assert snapshot(run) == before
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.st").exists()


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_only_checkpoint_says_so(run: Path, tmp_path: Path, capsys, damage: str) -> None:
    for step in (4, 8):
        shutil.rmtree(run / f"checkpoints/step-{step:06d}")
    weights = run / "checkpoints/step-000012/model.safetensors"
    DAMAGE[damage](weights)
    assert main(["generate", str(run), "--max_new_tokens=3"]) == 2
    assert "the run's only checkpoint" in one_line_error(capsys, "generate", weights)


@pytest.mark.parametrize("damage", DAMAGE)
def test_analyze_names_a_damaged_older_checkpoint(run: Path, capsys, damage: str) -> None:
    weights = run / "checkpoints/step-000004/model.safetensors"
    DAMAGE[damage](weights)
    assert main(["analyze", str(run), "--tokens=256", "--seq_len=32"]) == 2
    line = one_line_error(capsys, "analyze", weights)
    assert f"delete {run / 'checkpoints/step-000004'}" in line


@pytest.mark.parametrize("field", ["n_layers", "n_experts"])
def test_weights_of_another_model_are_named(run: Path, capsys, field: str) -> None:
    """config.json edited after training: more layers (missing tensors) or fewer experts (tensors
    of other shapes)."""
    cfg = json.loads((run / "config.json").read_text())
    if field == "n_layers":
        cfg["model"]["n_layers"] += 1
    else:
        cfg["model"]["moe"]["n_experts"] = 4
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", str(run), "--max_new_tokens=3"]) == 2
    line = one_line_error(capsys, "generate", run / "checkpoints/step-000012/model.safetensors")
    assert "config.json" in line


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["model.safetensors", "state.safetensors", "trainer.json"])
def test_resume_from_a_damaged_checkpoint_writes_nothing(
    run: Path, capsys, name: str, damage: str
) -> None:
    path = run / "checkpoints/step-000012" / name
    DAMAGE[damage](path)
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "step-000008" in one_line_error(capsys, "train", path)
    assert snapshot(run) == before


@pytest.mark.parametrize(
    "meta",
    [
        {"tokens": 1, "param_groups": []},
        [1, 2],
        {"step": "x", "tokens": 1},
        {"step": -1, "tokens": 1, "param_groups": []},  # was taken: it trained 13 more steps
    ],
)
def test_resume_from_a_trainer_json_without_its_fields(run: Path, capsys, meta) -> None:
    path = run / "checkpoints/step-000012/trainer.json"
    path.write_text(json.dumps(meta))
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    one_line_error(capsys, "train", path)
    assert snapshot(run) == before


@pytest.mark.parametrize("name", ["trainer.json", "state.safetensors"])
def test_resume_from_state_that_does_not_fit_the_run_writes_nothing(
    run: Path, capsys, name: str
) -> None:
    """Files that read well but hold another optimizer's groups or a broken generator state."""
    checkpoint = run / "checkpoints/step-000012"
    if name == "trainer.json":
        meta = json.loads((checkpoint / name).read_text())
        (checkpoint / name).write_text(json.dumps(meta | {"param_groups": []}))
    else:
        tensors = load_file(str(checkpoint / name))
        tensors["rng.sampler.generator"] = torch.zeros(3, dtype=torch.uint8)
        save_file(tensors, str(checkpoint / name))
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--train.steps=13"]) == 2  # a step left to train
    assert "does not fit this run" in one_line_error(capsys, "train", checkpoint / name)
    assert snapshot(run) == before


def test_resume_names_a_damaged_line_of_the_metrics(run: Path, capsys) -> None:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2][: len(lines[2]) // 2] + "\n"
    path.write_text("".join(lines))
    before = snapshot(run)
    assert main(["train", "--resume", str(run)]) == 2
    assert "line 3" in one_line_error(capsys, "train", path)
    assert snapshot(run) == before


def test_resume_drops_a_last_metrics_line_cut_short(run: Path) -> None:
    """A run killed while writing a record leaves part of a line; the record is of a step after
    the last checkpoint, which the resumed run writes again."""
    path = run / "metrics.jsonl"
    whole = path.read_text()
    last = whole.splitlines(keepends=True)[-1]
    path.write_text(whole + last[: len(last) // 2])
    assert main(["train", "--resume", str(run), "--train.steps=13"]) == 0
    assert path.read_text().startswith(whole)  # the cut line gone, step 13's records after
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()][-1] == 13


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["generate", "analyze", "convert"])
def test_damaged_run_tokenizer_is_named(
    run: Path, tmp_path: Path, capsys, command: str, damage: str
) -> None:
    path = run / "tokenizer.json"
    DAMAGE[damage](path)
    assert main(checkpoint_commands(run, tmp_path)[command]) == 2
    assert "moekit train --resume" in one_line_error(capsys, command, path)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["generate", "analyze", "convert", "train", "trace"])
def test_damaged_run_config_is_named(
    run: Path, tmp_path: Path, capsys, command: str, damage: str
) -> None:
    path = run / "config.json"
    DAMAGE[damage](path)
    before = snapshot(run)
    assert main(checkpoint_commands(run, tmp_path)[command]) == 2
    line = one_line_error(capsys, command, path)
    assert ("column" in line) if damage == "truncated" else ("not UTF-8" in line)
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("name", ["a shard", "model.safetensors.index.json", "config.json"])
def test_damaged_hugging_face_files_are_named(
    hf: Path, tmp_path: Path, capsys, name: str, damage: str
) -> None:
    shards = sorted(hf.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    path = shards[1] if name == "a shard" else hf / name
    DAMAGE[damage](path)
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "o")]) == 2
    assert "download" in one_line_error(capsys, "convert", path)
    assert not (tmp_path / "o").exists()
    assert main(["analyze", str(hf), "--tokens=256", "--seq_len=32"]) == 2
    one_line_error(capsys, "analyze", path)


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["analyze", "trace", "convert", "quantize"])
def test_damaged_hugging_face_tokenizer_is_named(
    hf: Path, tmp_path: Path, capsys, damage: str, command: str
) -> None:
    path = hf / "tokenizer.json"
    DAMAGE[damage](path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\n")
    args = {
        "analyze": ["analyze", str(hf), "--tokens=256", "--seq_len=32"],
        "trace": ["trace", str(hf), "--prompts", str(prompts), "--out", str(tmp_path / "t")],
        "convert": ["convert", "--from-hf", str(hf), "--out", str(tmp_path / "t")],
        # copied it into its run and exited 0, for the run's next command to fail on
        "quantize": ["quantize", str(hf), "--weights=int8", "--out", str(tmp_path / "t")],
    }
    assert main(args[command]) == 2
    assert "download" in one_line_error(capsys, command, path)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_routing_trace_is_named_with_what_to_do(
    run: Path, tmp_path: Path, capsys, damage: str
) -> None:
    prompts, trace = tmp_path / "prompts.txt", tmp_path / "trace.safetensors"
    prompts.write_text("def f(\n")
    assert main(["trace", str(run), "--prompts", str(prompts), "--out", str(trace)]) == 0
    capsys.readouterr()
    DAMAGE[damage](trace)
    for args in (
        ["cache-sim", str(trace)],
        [
            "generate",
            str(run),
            "--offload.budget=50%",
            "--offload.policy=static",
            f"--offload.trace={trace}",
        ],
    ):
        assert main(args) == 2
        assert "moekit trace" in one_line_error(capsys, args[0], trace)


def test_hugging_face_index_without_a_weight_map(hf: Path, tmp_path: Path, capsys) -> None:
    path = hf / "model.safetensors.index.json"
    path.write_text(json.dumps({"metadata": {}}))
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "o")]) == 2
    assert "weight_map" in one_line_error(capsys, "convert", path)


@pytest.mark.parametrize("command", ["train", "params"])
def test_config_file_that_is_not_json_names_the_file_and_the_position(
    tmp_path: Path, capsys, command: str
) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"model": {"d_model": 64, }}')
    assert main([command, str(path)]) == 2
    line = one_line_error(capsys, command, path)
    assert "line 1, column 27" in line and "double quotes" in line
    assert not any(p.name != "broken.json" for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "data, says",
    [
        ([1, 2], "not an object"),
        ({"model": 5}, "model"),
        ({"d_model": 64, "vocab_size": 257, "n_layers": 2}, "n_heads"),
        ({"model": {"d_model": 64, "vocab_size": 257, "n_heads": 2}}, "n_layers"),
    ],
)
def test_config_file_of_the_wrong_shape_names_the_file(tmp_path: Path, capsys, data, says) -> None:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    assert main(["params", str(path)]) == 2
    assert says in one_line_error(capsys, "params", path)


# Where a command writes: a file in the way, a directory where a file goes, a directory that may
# not be written in. Each was a traceback (NotADirectoryError, IsADirectoryError, PermissionError)
# or an "[Errno 17] File exists" line naming no remedy.


def write_commands(run: Path, hf: Path, tmp_path: Path, out: Path) -> dict[str, list[str]]:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(\n")
    return {
        "train": ["train", str(run / "config.json"), "--out", str(out)],
        "from-hf": ["convert", "--from-hf", str(hf), "--out", str(out)],
        "to-hf": ["convert", "--to-hf", str(run), "--arch", "mixtral", "--out", str(out),
                  "--overwrite"],
        "quantize": ["quantize", str(run), "--weights=int8", "--out", str(out)],
        "upcycle": ["upcycle", str(run), "--out", str(out)],
        "trace": ["trace", str(run), "--prompts", str(prompts), "--out", str(out / "r.trace"),
                  "--max_new_tokens=2"],
        "analyze": ["analyze", str(run), "--tokens=256", "--seq_len=32", "--out", str(out)],
        "demo": ["demo", "--out", str(out), "--train.steps=1", "--train.data.tokenizer=bytes",
                 f"--train.data.source={JSON_PACKAGE}",
                 f"--train.data.cache_dir={tmp_path / 'cache'}"],
    }  # fmt: skip


WRITERS = ["train", "from-hf", "to-hf", "quantize", "upcycle", "trace", "analyze", "demo"]
AT_A_FILE = ["train", "to-hf", "trace", "analyze"]  # the others refuse an existing --out as such


@pytest.mark.parametrize(
    "command, under",
    [(c, True) for c in WRITERS] + [(c, False) for c in AT_A_FILE],
    ids=[f"{c} under a file" for c in WRITERS] + [f"{c} at a file" for c in AT_A_FILE],
)
def test_an_output_path_through_a_file_is_one_line_and_writes_nothing(
    run: Path, hf: Path, tmp_path: Path, capsys, command: str, under: bool
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("mine\n")
    args = write_commands(run, hf, tmp_path, blocker / "sub" if under else blocker)[command]
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(args) == 2
    line = one_line_error(capsys, args[0], blocker)
    assert f"{blocker} is a file, not a directory; move it away or choose another path" in line
    assert snapshot(tmp_path) == before


def test_a_trace_written_over_a_directory_is_one_line(run: Path, tmp_path: Path, capsys) -> None:
    prompts, out = tmp_path / "prompts.txt", tmp_path / "traces"
    prompts.write_text("def f(\n")
    out.mkdir()
    assert main(["trace", str(run), "--prompts", str(prompts), "--out", str(out)]) == 2
    line = one_line_error(capsys, "trace", out)
    assert f"is a directory; give the trace a file name, such as {out / 'routing.trace'}" in line
    assert list(out.iterdir()) == [] and {p.name for p in tmp_path.iterdir()} == {
        "run",
        "prompts.txt",
        "traces",
    }


# What creating a name in a folder may meet: a folder of another user's (root may), a file
# system that takes no new files (/proc: ENOENT; the line named the temporary beside the output,
# "[Errno 2] No such file or directory: .../.out.x1y2.tmp"), a full disk (a traceback).
REFUSALS = {
    "may not be written in": (PermissionError, errno.EACCES, "Permission denied",
                              "{folder} may not be written in (permission denied); choose a"),
    "takes no new files": (FileNotFoundError, errno.ENOENT, "No such file or directory",
                           "creating it in {folder} failed (no such file or directory); choose"),
    "is full": (OSError, errno.ENOSPC, "No space left on device",
                "{folder} has no room (no space left on device); free some space"),
}  # fmt: skip


@pytest.mark.parametrize("refusal", REFUSALS)
@pytest.mark.parametrize("command", [c for c in WRITERS if c != "upcycle"])  # the run is no dense
def test_a_folder_that_refuses_the_output_is_one_line_naming_it(
    run: Path, hf: Path, tmp_path: Path, capsys, monkeypatch, command: str, refusal: str
) -> None:
    kind, code, reason, says = REFUSALS[refusal]
    folder = tmp_path / "folder"
    folder.mkdir()
    args = write_commands(run, hf, tmp_path, folder / "out")[command]
    mkdir = os.mkdir

    def refuse(path, *args, **kwargs) -> None:
        if Path(path).parent == folder:
            raise kind(code, reason, str(path))
        mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err  # the error's line last, after convert --from-hf's progress
    line = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    assert line.startswith(f"moekit {args[0]}: error: cannot write {folder / 'out'}"), err
    assert says.format(folder=folder) in line and ".tmp" not in line, line
    assert list(folder.iterdir()) == []


def test_a_directory_given_as_a_routing_trace_is_one_line(run: Path, tmp_path: Path, capsys):
    """safetensors said "No such device (os error 19)", a traceback."""
    for args in (
        ["cache-sim", str(tmp_path)],
        ["generate", str(run), "--offload.budget=50%", "--offload.policy=static",
         f"--offload.trace={tmp_path}"],
    ):  # fmt: skip
        assert main(args) == 2
        assert "is a directory, not a file" in one_line_error(capsys, args[0], tmp_path)
    assert main(["cache-sim", os.devnull]) == 2  # said "No such device" too
    line = one_line_error(capsys, "cache-sim", os.devnull)
    assert "/dev/null is not a regular file (a device or a pipe); record" in line, line


def test_a_checkpoint_of_the_other_kind_says_to_convert_it(
    run: Path, hf: Path, tmp_path: Path, capsys
) -> None:
    """A Hugging Face directory where a run goes was a list of RunConfig's unknown fields; a run
    given to --from-hf was "architecture None (None) is not supported"."""
    out = tmp_path / "o"
    for args, says in (
        (["train", "--resume", str(hf)], f"convert it to one first (moekit convert --from-hf {hf}"),
        (["upcycle", str(hf), "--out", str(out)], "is a Hugging Face checkpoint, not a run"),
        (["convert", "--from-hf", str(run), "--out", str(out)], f"--to-hf {run} --arch ARCH"),
    ):
        before = snapshot(hf)
        assert main(args) == 2
        assert says in one_line_error(capsys, args[0], hf if "--from-hf" not in args else run)
        assert snapshot(hf) == before and not out.exists()
