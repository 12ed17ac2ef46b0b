"""Runs in lockstep: each compared with a baseline by steps and by training time."""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.run_cases import tiny_run

from moekit.config import dense_twin
from moekit.data import prepare_data
from moekit.train.lockstep import (
    INTERRUPTED,
    SideBySideFailed,
    _stop,
    _train_one,
    compare_to,
    design_configs,
    lockstep_settings,
    run_in_parallel,
    run_summary,
    seconds_at,
    train_designs,
    train_in_lockstep,
)
from moekit.train.metrics import read_metrics


def _run(final: float, curve: list, seconds: list, tokens_per_s: float) -> dict:
    return {"final_val_loss": final, "final_val_bpb": final / 2, "val_curve": curve,
            "seconds_curve": seconds, "train_seconds": seconds[-1][1],
            "tokens_per_s": tokens_per_s}  # fmt: skip


def test_time_ratio_is_the_time_to_reach_the_baseline_over_its_whole_time() -> None:
    dense = _run(4.0, [[50, 4.5], [100, 4.0]], [[50, 5.0], [100, 10.0]], 2.0)
    moe = _run(3.8, [[50, 4.0], [100, 3.8]], [[40, 8.0], [100, 20.0]], 1.0)
    table = compare_to({"dense": dense, "moe": moe}, "dense", steps=100)
    assert table["moe"]["step_ratio"] == 0.5
    assert seconds_at(moe, 50) == pytest.approx(10.0)  # between the logged steps 40 and 100
    assert table["moe"]["time_ratio"] == pytest.approx(1.0)  # 10 s to step 50, of dense's 10 s
    assert table["moe"]["throughput_ratio"] == 0.5
    assert table["moe"]["val_loss_below"] == pytest.approx(0.2)
    assert table["dense"]["step_ratio"] == table["dense"]["time_ratio"] == 1.0
    assert table["moe"]["time_ratio_same_steps"] == pytest.approx(1.0)  # uniform load: the same
    slowed = _run(4.0, [[50, 4.5], [100, 4.0]], [[50, 5.0], [100, 20.0]], 2.0)  # a busy end
    table = compare_to({"dense": slowed, "moe": moe}, "dense", steps=100)
    assert table["moe"]["time_ratio"] == pytest.approx(0.5)  # 10 s of dense's 20 s
    assert table["moe"]["time_ratio_same_steps"] == pytest.approx(1.0)  # 0.5 x 10 s / 5 s
    never = _run(4.2, [[50, 4.5], [100, 4.2]], [[100, 10.0]], 2.0)
    assert compare_to({"dense": dense, "x": never}, "dense", 100)["x"]["time_ratio"] is None


def test_lockstep_runs_are_ordinary_runs_with_timed_curves(tmp_path: Path) -> None:
    base = tiny_run(tmp_path)
    train = lockstep_settings(base.train, steps=8, evals=2)
    moe = base.replace(train=train)
    dense = moe.replace(model=moe.model.replace(moe=None, d_ff=128))
    dirs = {"moe": tmp_path / "moe", "dense": tmp_path / "dense"}
    train_in_lockstep({"moe": moe, "dense": dense}, dirs, progress=False)
    runs = {"moe": run_summary(dirs["moe"], moe), "dense": run_summary(dirs["dense"], dense)}
    assert [s for s, _ in runs["moe"]["val_curve"]] == [4, 8]
    steps, seconds = zip(*runs["dense"]["seconds_curve"], strict=True)
    assert steps[-1] == 8 and all(b > a for a, b in itertools.pairwise(seconds))
    assert runs["dense"]["train_seconds"] == seconds[-1]
    assert (dirs["moe"] / "checkpoints" / "step-000008" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"same train\.steps"):
        train_in_lockstep({"a": moe, "b": dense.replace(train=train.replace(steps=4))}, dirs)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, set[str]]:
    """An MoE, its dense twin and a run that diverges at its first step, trained at once by
    `run_in_parallel` (a process each, one thread each; a diverged run ends alone): the configs,
    run directories and diverged runs that the next two tests read. The diverging run reads a
    tokenizer.json prepared in its folder (tokenizer "run"): that folder is a new run's."""
    work = tmp_path_factory.mktemp("side")
    base = tiny_run(work)
    moe = base.replace(train=lockstep_settings(base.train, steps=6, evals=2).replace(threads=1))
    prepared = moe.train.data.replace(tokenizer="run")
    configs = {
        "moe": moe,
        "dense": moe.replace(model=dense_twin(moe.model)),
        "blows-up": moe.replace(train=moe.train.replace(lr=1e30, warmup_steps=0, data=prepared)),
    }
    dirs = {name: work / name for name in configs}
    dirs["blows-up"].mkdir()
    tokenizer = prepare_data(moe.train.data, moe.token_vocab_size).tokenizer
    tokenizer.save(str(dirs["blows-up"] / "tokenizer.json"))
    return configs, dirs, run_in_parallel(configs, dirs, progress=False, divergence_ends_a_run=True)


def test_runs_in_parallel_are_the_runs_of_one_process_each(side_by_side, tmp_path: Path) -> None:
    """Processes at once give the runs of training each alone (same seed, same data, one thread
    each): the same losses at every logged step and evaluation."""
    configs, dirs, _ = side_by_side
    moe, dense = configs["moe"], configs["dense"]
    runs = {name: run_summary(dirs[name], cfg) for name, cfg in (("moe", moe), ("dense", dense))}
    train_in_lockstep({"dense": dense}, {"dense": tmp_path / "alone"}, progress=False)
    assert runs["dense"]["val_curve"] == run_summary(tmp_path / "alone", dense)["val_curve"]
    losses = [[r.get("lm_loss") for r in read_metrics(d / "metrics.jsonl")]
              for d in (dirs["dense"], tmp_path / "alone")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) > 4
    assert runs["moe"]["active_parameters"] < runs["moe"]["parameters"]
    assert [s for s, _ in runs["moe"]["val_curve"]] == [3, 6]


def test_a_run_that_fails_in_its_process_stops_the_others_and_is_named(
    tmp_path: Path, capfd
) -> None:
    base = tiny_run(tmp_path)
    cfg = base.replace(train=lockstep_settings(base.train, steps=2, evals=1))
    train_in_lockstep({"a": cfg}, {"a": tmp_path / "a"}, progress=False)  # a run is there now
    with pytest.raises(FileExistsError, match="already holds a run"):  # before any process
        run_in_parallel({"a": cfg, "b": cfg}, {"a": tmp_path / "a", "b": tmp_path / "b"})
    (tmp_path / "file").write_text("not a folder")  # a file in a run's way: before any process
    with pytest.raises(FileExistsError, match="file is a file, not a directory"):
        run_in_parallel({"a": cfg, "b": cfg}, {"a": tmp_path / "c", "b": tmp_path / "file/b"})
    assert not (tmp_path / "c").exists()
    missing = cfg.replace(train=cfg.train.replace(init_from=str(tmp_path / "none")))  # its process
    long = cfg.replace(train=cfg.train.replace(steps=400))
    with pytest.raises(SideBySideFailed, match=r"b \(failed with exit code 2") as err:
        run_in_parallel({"a": long, "b": missing}, {"a": tmp_path / "c", "b": tmp_path / "d"})
    assert "a (interrupted" in str(err.value)  # stopped, not left to run its 400 steps
    assert "error: train.init_from=" in capfd.readouterr().err


def test_a_run_stopped_while_it_starts_is_interrupted_where_ctrl_c_is_ignored(tmp_path) -> None:
    """A shell's background job (CI) ignores SIGINT, and a spawned run inherits that until it
    installs its handler, seconds later, after importing torch: the Ctrl-C `_stop` sends must
    wait for the run to listen, or it is lost and the run trains to its end (as it once did in CI:
    a 400-step run finished instead of being stopped)."""
    base = tiny_run(tmp_path)
    cfg = base.replace(train=base.train.replace(steps=100_000, progress=False))
    context = multiprocessing.get_context("spawn")
    listening = context.Event()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the spawned run
    try:
        run = context.Process(target=_train_one, args=(cfg, str(tmp_path / "r"), os.getpid(),
                                                       listening))  # fmt: skip
        run.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not listening.is_set()  # still importing: the stop below races its start
    started = time.monotonic()
    _stop([(run, listening)])
    assert run.exitcode == INTERRUPTED and time.monotonic() - started < 60


# run_in_parallel in a session of its own, as from a terminal: "following" once the runs started
TERMINAL_RUN = """
import signal, sys
# a terminal's foreground process takes Ctrl-C; this one may inherit SIG_IGN for it, as every
# process of a shell's background job does (pytest run as one), and would then never take it
signal.signal(signal.SIGINT, signal.default_int_handler)
from pathlib import Path
from tests.run_cases import tiny_run
from moekit.train import lockstep
work = Path(sys.argv[1])
cfg = tiny_run(work, steps=100_000)
follow = lockstep._follow
def announced(*args):
    print("following", flush=True)
    return follow(*args)
lockstep._follow = announced
try:
    lockstep.run_in_parallel({"a": cfg, "b": cfg}, {"a": work / "a", "b": work / "b"}, False)
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="a terminal's process group, POSIX")
def test_a_terminal_ctrl_c_while_the_runs_start_stops_them_without_a_traceback(tmp_path) -> None:
    """A terminal's Ctrl-C reaches its whole foreground process group, which holds the runs until
    they leave it (seconds, importing torch first): they start deaf to it, and the parent passes
    it on once they listen, so each saves and exits 130 instead of dying with a traceback."""
    tiny_run(tmp_path)  # the data is cached by the parent before it starts the runs
    parent = subprocess.Popen(
        [sys.executable, "-c", TERMINAL_RUN, str(tmp_path)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert parent.stdout is not None and parent.stdout.readline() == "following\n"
        time.sleep(0.5)  # the runs are importing (an interpreter just exec'd dies silently)
        os.killpg(parent.pid, signal.SIGINT)  # as the terminal does: every process of the group
        out, err = parent.communicate(timeout=120)
    finally:
        parent.kill()
    assert out == "interrupted\n" and "Traceback" not in err, err


def test_a_run_that_diverges_ends_alone_when_divergence_ends_a_run(
    side_by_side, tmp_path: Path
) -> None:
    """An experiment's arm may diverge (a high learning rate is one of its arms): it ends, the
    others train to the end; for a comparison, a diverged run stops them all and is named."""
    configs, dirs, diverged = side_by_side
    assert diverged == {"blows-up"}
    for name in ("moe", "dense"):
        assert [r["step"] for r in read_metrics(dirs[name] / "metrics.jsonl")][-1] == 6
    blows_up = configs["blows-up"]  # with the corpus' tokenizer: no tokenizer.json prepared
    blows_up = blows_up.replace(train=blows_up.train.replace(data=configs["moe"].train.data))
    compared = {"ok": configs["dense"], "blows-up": blows_up}
    dirs = {name: tmp_path / "compare" / name for name in compared}
    with pytest.raises(SideBySideFailed, match=r"blows-up \(diverged"):
        run_in_parallel(compared, dirs, progress=False)


def test_designs_are_overrides_of_a_base_trained_side_by_side_once_per_seed(tmp_path: Path):
    base = tiny_run(tmp_path)
    base = base.replace(train=lockstep_settings(base.train, steps=2, evals=1))
    dense = ["--model.moe=null", f"--model.d_ff={base.model.moe.active_width}"]
    configs = design_configs(base, {"dense": dense, "moe": []})
    assert configs["moe"] == base and configs["dense"].model.moe is None
    per_seed = list(train_designs(configs, seeds=2, out=tmp_path / "out"))
    seeds = [json.loads((tmp_path / f"out/moe/seed-{s}/config.json").read_text())["train"]["seed"]
             for s in (0, 1)]  # fmt: skip
    assert seeds == [base.train.seed, base.train.seed + 1]
    assert per_seed[0]["moe"]["val_curve"] != per_seed[1]["moe"]["val_curve"]
    assert [s[1] for s in per_seed[1]["dense"]["seconds_curve"]][-1] > 0


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("parent_dies", ["while the run trains", "before the run asks"])
def test_a_run_whose_parent_is_killed_stops_as_on_ctrl_c(tmp_path, parent_dies) -> None:
    """run_in_parallel's runs live in process groups of their own: when their parent dies without
    stopping them (SIGKILL), each gets the Ctrl-C it would have sent, instead of training on; also
    when the parent died while the run was still starting (importing torch takes seconds)."""
    started, stopped = tmp_path / "started", tmp_path / "stopped"
    delay = 0 if parent_dies == "while the run trains" else 2
    child = (
        "import os, sys, time\n"
        "from moekit.train.lockstep import _interrupt_when_parent_dies\n"
        f"open({str(started)!r}, 'w').close()\n"
        "try:\n"
        f"    time.sleep({delay})\n"
        "    _interrupt_when_parent_dies(int(sys.argv[1]))\n"
        "    time.sleep(120)\n"
        f"except KeyboardInterrupt:\n    open({str(stopped)!r}, 'w').close()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import os, subprocess, sys, time\n"
         f"subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid())])\n"
         "time.sleep(120)"]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.exists(), "the child did not start"
        time.sleep(0.5 if delay == 0 else 0)  # armed by then, or not yet
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while not stopped.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stopped.exists()
