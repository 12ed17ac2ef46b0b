"""Training: the loss falls, resume is exact, checkpoints are atomic, divergence stops the run."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.run_cases import JSON_PACKAGE, tiny_run

from moekit.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from moekit.data import load_corpus
from moekit.model import MoETransformer
from moekit.train import TrainingDiverged, build_optimizer, list_checkpoints, load_checkpoint, lr_at
from moekit.train import checkpoint as checkpoint_module
from moekit.train import loop as loop_module
from moekit.train.checkpoint import TrainerState, save_checkpoint
from moekit.train.metrics import read_metrics


def losses(run_dir: Path) -> list[tuple[str, int, float]]:
    """(kind, step, loss) of every record of a run's metrics.jsonl."""
    out = []
    for r in read_metrics(run_dir / "metrics.jsonl"):
        out.append((r["kind"], r["step"], r["loss"] if r["kind"] == "train" else r["val_loss"]))
    return out


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Send ourselves Ctrl-C (SIGINT) during optimizer step `step`, as a user would."""
    original = loop_module.Trainer._train_step

    def step_then_interrupt(self: loop_module.Trainer):  # type: ignore[no-untyped-def]
        result = original(self)
        if self.step + 1 == step:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(loop_module.Trainer, "_train_step", step_then_interrupt)


def test_loss_falls_over_30_steps(tmp_path: Path) -> None:
    cfg = tiny_run(tmp_path, steps=30, log_every=5, eval=EvalConfig(every=0, batches=2))
    result = loop_module.train(cfg, tmp_path / "run")
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert result.step == 30
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0


def test_compiled_training_and_bf16_autocast_follow_the_plain_run(tmp_path: Path, capfd) -> None:
    """train.compile and train.bf16: the compiled model's losses are the eager ones to float32
    rounding, bf16 autocast's to bf16's; compiling logs no error (a probe of torch._grouped_mm
    traced inside the graph had logged the meta kernel's traceback at every MoE layer)."""

    def train_losses(name: str, **train: object) -> list[float]:
        cfg = tiny_run(tmp_path, steps=2, eval=EvalConfig(every=0, batches=1), **train)
        loop_module.train(cfg, tmp_path / name)
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        return [r["lm_loss"] for r in records if r["kind"] == "train"]

    plain = train_losses("plain")
    capfd.readouterr()
    torch._dynamo.utils.counters.clear()  # the graphs this run compiles, alone
    assert train_losses("compiled", compile=True) == pytest.approx(plain, rel=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    logged = capfd.readouterr().err
    assert "Traceback" not in logged and "failed while attempting" not in logged, logged[-2000:]
    assert train_losses("bf16", bf16=True) == pytest.approx(plain, rel=2e-2)


def test_ctrl_c_saves_a_checkpoint_and_stops(tmp_path: Path, monkeypatch) -> None:
    interrupt_at(monkeypatch, 3)
    result = loop_module.train(tiny_run(tmp_path), tmp_path / "run")
    assert result.interrupted and result.step == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-000003"]


def test_an_interrupted_train_command_exits_130_after_saying_how_to_resume(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """It exited 0, so `moekit train ... && next` went on with a run not trained to its end."""
    from moekit.cli import main

    interrupt_at(monkeypatch, 2)
    args = ["train", "tiny", f"--out={tmp_path / 'run'}", "--train.progress=false",
            f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(args) == 130
    out = capsys.readouterr()
    assert f"continue with: moekit train --resume {tmp_path / 'run'}" in out.out
    assert out.err.endswith("moekit train: interrupted\n")


def test_a_warmup_longer_than_the_run_is_a_note(tmp_path: Path, capsys) -> None:
    from moekit.cli import main

    args = ["train", "tiny", f"--out={tmp_path / 'run'}", "--train.progress=false",
            "--train.steps=2", "--train.warmup_steps=100", "--train.eval.batches=1",
            f"--train.data.source={JSON_PACKAGE}", "--train.data.tokenizer=bytes",
            f"--train.data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    assert main(args) == 0
    assert (
        "note: train.warmup_steps=100 outlasts the run (train.steps=2)" in capsys.readouterr().err
    )


def test_resume_gives_exactly_the_losses_of_an_uninterrupted_run(tmp_path: Path, monkeypatch):
    cfg = tiny_run(tmp_path)
    loop_module.train(cfg, tmp_path / "straight")
    with monkeypatch.context() as patch:
        interrupt_at(patch, 6)
        loop_module.train(cfg, tmp_path / "halves")
    loop_module.train(cfg, tmp_path / "halves", resume=True)
    assert losses(tmp_path / "halves") == losses(tmp_path / "straight")


# Trains tiny_run with a noisy router for each of the noises: "straight" for all 12 steps, then
# "first" until a Ctrl-C during step 6 (the modes in order, one process); or "resume" from that
# run's checkpoint (a fresh process for each noise). A fresh process meets every first-call probe
# (cached per process) at the step where a user's resumed process meets it. (A probe that drew from
# the global RNG would also set "first" apart from a "straight" that met the probe first.)
FRESH_PROCESS_RUN = """
import signal, sys
from pathlib import Path
from tests.run_cases import tiny_run
from moekit.train import loop

work, modes, noises = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[3].split(",")
step = loop.Trainer._train_step
def step_then_interrupt(self):
    result = step(self)
    if self.step + 1 == 6:
        signal.raise_signal(signal.SIGINT)
    return result
for noise in noises:
    cfg = tiny_run(work)
    cfg = cfg.replace(model=cfg.model.replace(moe=cfg.model.moe.replace(noise=noise)))
    for mode in modes:
        loop.Trainer._train_step = step_then_interrupt if mode == "first" else step
        run = work / noise / ("straight" if mode == "straight" else "halves")
        loop.train(cfg, run, resume=mode == "resume")
"""
NOISES = ("jitter", "gaussian")


def run_fresh(work: Path, modes: str, noises: str) -> None:
    subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_RUN, str(work), modes, noises],
        check=True,
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def noisy_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Each noise's "straight" and "first" runs, all trained in one fresh process."""
    work = tmp_path_factory.mktemp("noisy")
    run_fresh(work, "straight,first", ",".join(NOISES))
    return work


@pytest.mark.parametrize("noise", NOISES)
def test_resume_in_a_fresh_process_is_exact_with_a_noisy_router(noisy_runs: Path, noise: str):
    """Router noise draws from the global RNG, which the checkpoint restores: nothing else in a
    resumed process may draw from it first (issue 13: the grouped_mm probe did)."""
    run_fresh(noisy_runs, "resume", noise)
    work = noisy_runs / noise
    assert losses(work / "halves") == losses(work / "straight")
    straight, halves = (list_checkpoints(work / r)[-1] for r in ("straight", "halves"))
    assert straight.name == halves.name == "step-000012"
    a, b = (load_file(str(c / "model.safetensors")) for c in (straight, halves))
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def record_forwards(
    monkeypatch: pytest.MonkeyPatch,
) -> list[tuple[bool, torch.nn.Module, torch.Tensor, float]]:
    """From now on, each forward the trainer runs: (training?, the model, the batch, lm_loss)."""
    seen = []
    original = loop_module.forward

    def recording(model, batch, autocast):  # type: ignore[no-untyped-def]
        out = original(model, batch, autocast)
        seen.append((model.training, model, batch.clone(), float(out.lm_loss.detach())))
        return out

    monkeypatch.setattr(loop_module, "forward", recording)
    return seen


@pytest.mark.parametrize("grad_clip", [None, 0.05])
def test_a_step_applies_the_clipped_mean_gradient_of_its_micro_batches(
    tmp_path: Path, monkeypatch, grad_clip: float | None
) -> None:
    """The gradients the optimizer steps with are those of the mean loss over the grad_accum
    micro-batches (a copy of the model recomputes them here), scaled to a global norm of
    train.grad_clip when they exceed it; the logged grad_norm is the norm before clipping."""
    cfg = tiny_run(tmp_path, steps=1, grad_accum=2, batch_size=2, seq_len=32, grad_clip=grad_clip)
    forwards = record_forwards(monkeypatch)
    checked = []
    real_build = loop_module.build_optimizer

    def build(model, t):  # type: ignore[no-untyped-def]
        optimizer = real_build(model, t)

        def before_step(opt, args, kwargs) -> None:  # type: ignore[no-untyped-def]
            micro = [batch for training, _, batch, _ in forwards if training]
            assert len(micro) == 2
            twin = copy.deepcopy(model)
            twin.zero_grad(set_to_none=True)
            for batch in micro:
                (twin(batch, labels=batch).loss / len(micro)).backward()
            want = {n: p.grad for n, p in twin.named_parameters()}
            norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()])))
            scale = 1.0 if grad_clip is None else min(1.0, grad_clip / (norm + 1e-6))
            assert grad_clip is None or scale < 0.5  # the clip binds
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad, want[name] * scale, rtol=1e-4, atol=1e-7)
            checked.append(norm)

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    monkeypatch.setattr(loop_module, "build_optimizer", build)
    loop_module.train(cfg, tmp_path / "run")
    assert len(checked) == 1
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert logged[0]["grad_norm"] == pytest.approx(checked[0], rel=1e-4)


def test_validation_loss_is_the_mean_over_its_batches_and_bpb_its_bits_per_byte(
    tmp_path: Path, monkeypatch
) -> None:
    """val_loss: the mean lm_loss of the eval batches; val_bpb: val_loss in bits, over the UTF-8
    bytes per token of the validation split (bytes tokenizer: each byte a token, plus one
    end-of-text token per file)."""
    cfg = tiny_run(tmp_path, steps=1, eval=EvalConfig(every=1, batches=3))
    forwards = record_forwards(monkeypatch)
    loop_module.train(cfg, tmp_path / "run")
    evals = [loss for training, _, _, loss in forwards if not training]
    assert len(evals) == 3 and len(set(evals)) == 3
    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert record["val_loss"] == pytest.approx(sum(evals) / 3, rel=1e-9)
    data = cfg.train.data
    val = load_corpus(data.source, data.val_fraction, data.max_files).val
    bytes_per_token = val.n_bytes / (val.n_bytes + len(val.documents))
    assert 0.9 < bytes_per_token < 1
    assert record["val_bpb"] == pytest.approx(record["val_loss"] / math.log(2) / bytes_per_token)


FIRST_FORWARD = """
import torch
from moekit.config import ModelConfig
from moekit.model import MoETransformer

torch.manual_seed(0)
model = MoETransformer(ModelConfig.preset("tiny"))
before = torch.get_rng_state()
ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
model(ids, labels=ids).loss.backward()
print(torch.equal(before, torch.get_rng_state()))
"""


def test_a_first_forward_without_noise_draws_nothing_from_the_global_rng() -> None:
    """Library code draws from the global RNG only for init, router noise and sampling: a model's
    first training forward (which runs every per-process probe) leaves it where it was."""
    out = subprocess.run(
        [sys.executable, "-c", FIRST_FORWARD], check=True, capture_output=True, text=True
    )
    assert out.stdout.strip() == "True"


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path: Path) -> None:
    cfg = tiny_run(tmp_path, steps=2)
    loop_module.train(cfg, tmp_path / "run")
    with pytest.raises(FileExistsError, match="--resume"):
        loop_module.train(cfg, tmp_path / "run")


def test_fresh_run_refuses_a_folder_of_other_files_and_keeps_them(tmp_path: Path) -> None:
    """A Hugging Face checkpoint, or a user's own files, given as --out: the run had replaced
    their config.json and report.md. A run stopped before its first checkpoint trains again."""
    cfg = tiny_run(tmp_path, steps=1)
    hf, own = tmp_path / "hf", tmp_path / "own"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "mixtral"}')
    (hf / "model.safetensors").write_bytes(b"weights")
    own.mkdir()
    (own / "report.md").write_text("my notes")
    tokenizer = tmp_path / "tokenizer"  # a Hugging Face tokenizer alone: not a run's files
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text("{}")
    (tokenizer / "tokenizer_config.json").write_text("{}")
    for folder in (hf, own, tokenizer):
        before = {f.name: f.read_bytes() for f in folder.iterdir()}
        with pytest.raises(
            FileExistsError,
            match=r"not a moekit run's \((config.json, model.safetensors|report.md|tokenizer.js)",
        ):
            loop_module.train(cfg, folder)
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == before
    stopped, died = tmp_path / "stopped", tmp_path / "died"  # before config.json was written
    for folder in (stopped, died):
        folder.mkdir()
        (folder / "metrics.jsonl").write_text("")
        (folder / "tensorboard").mkdir()
    (stopped / "config.json").write_text(cfg.to_json())
    assert loop_module.train(cfg, stopped).step == 1
    assert loop_module.train(cfg, died).step == 1
    prepared = tmp_path / "prepared"  # a tokenizer copied in for train.data.tokenizer="run"
    prepared.mkdir()
    shutil.copy(stopped / "tokenizer.json", prepared / "tokenizer.json")
    data = cfg.train.data.replace(tokenizer="run")
    assert loop_module.train(cfg.replace(train=cfg.train.replace(data=data)), prepared).step == 1


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch) -> None:
    model = MoETransformer(ModelConfig.preset("tiny"))
    optimizer = build_optimizer(model, TrainConfig())
    state = TrainerState(
        1, 100, {"generator": torch.Generator().get_state()}, torch.get_rng_state()
    )
    first = save_checkpoint(tmp_path, model.state_dict(), optimizer.state_dict(), state, keep=2)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    written = []
    save_file = checkpoint_module.save_file

    def fail_midway(tensors: dict, path: str) -> None:
        if written:
            raise OSError("disk full")  # after model.safetensors was written, before the rest
        written.append(path)
        save_file(tensors, path)

    monkeypatch.setattr(checkpoint_module, "save_file", fail_midway)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    state.step = 2
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, model.state_dict(), optimizer.state_dict(), state, keep=2)
    assert written[-1].endswith("model.safetensors")
    assert list((tmp_path / "checkpoints").iterdir()) == [first]
    fresh = MoETransformer(ModelConfig.preset("tiny"))
    assert load_checkpoint(first, fresh, build_optimizer(fresh, TrainConfig())).step == 1
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    calls = []
    original = loop_module.forward

    def nan_at_fifth_step(model, batch, autocast):  # type: ignore[no-untyped-def]
        out = original(model, batch, autocast)
        calls.append(model.training)
        if sum(calls) == 5:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop_module, "forward", nan_at_fifth_step)
    cfg = tiny_run(tmp_path, checkpoint=CheckpointConfig(every=2, keep=2))
    with pytest.raises(TrainingDiverged, match=r"at step 5: the loss is nan.*step-000004"):
        loop_module.train(cfg, tmp_path / "run")
    last = list_checkpoints(tmp_path / "run")[-1]
    fresh = MoETransformer(cfg.model)
    assert load_checkpoint(last, fresh).step == 4
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: TrainConfig(lr=0.0), "lr"),
        (lambda: TrainConfig(betas=(0.9, 1.5)), "betas"),
        (lambda: TrainConfig(device="gpu"), "device"),
        (lambda: DataConfig(tokenizer="words"), "tokenizer"),  # type: ignore[arg-type]
        (lambda: DataConfig(val_fraction=1.0), "val_fraction"),
        (lambda: RunConfig(model=ModelConfig.preset("tiny"), train=TrainConfig()), "seq_len"),
    ],
)
def test_bad_config_names_the_field(build, field: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}="):
        build()


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4)


def test_the_decay_after_warmup_is_a_cosine() -> None:
    """101 steps, 10 of warmup: steps 10..100 decay over 90 steps. A third of the way (step 40)
    the cosine factor is (1 + cos(pi / 3)) / 2 = 0.75, two thirds (step 70) 0.25: lr is
    1e-3 * (0.1 + 0.9 * 0.75) = 7.75e-4, then 3.25e-4 (a linear decay: 7e-4, then 4e-4); past
    the last step it stays at the floor."""
    cfg = TrainConfig(steps=101, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(40, cfg) == pytest.approx(7.75e-4)
    assert lr_at(70, cfg) == pytest.approx(3.25e-4)
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(150, cfg) == pytest.approx(1e-4)


def test_no_weight_decay_on_norms_embeddings_and_routers() -> None:
    model = MoETransformer(ModelConfig.preset("tiny"))
    decayed, plain = build_optimizer(model, TrainConfig()).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0 and decayed["weight_decay"] > 0
    assert {"embed.weight", "norm.weight", "layers.0.ffn.router.weight"} <= plain_names
    assert "layers.0.attn.q_proj.weight" in {names[id(p)] for p in decayed["params"]}


def test_a_config_for_several_processes_is_refused_on_one(tmp_path: Path, capsys) -> None:
    """train() is the one-process entry; a config asking for expert parallelism says how to
    launch it (moekit train under torchrun) before anything is written."""
    cfg = tiny_run(tmp_path)
    cfg = cfg.replace(parallel=cfg.parallel.replace(ep=2))
    with pytest.raises(ValueError, match="needs several processes: train with `moekit train`"):
        loop_module.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    from moekit.cli import main

    (tmp_path / "run.json").write_text(cfg.to_json())
    assert main(["train", str(tmp_path / "run.json"), "--out", str(tmp_path / "cli")]) != 0
    assert "launch with torchrun" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()


def test_a_resumed_run_keeps_its_tokenizer(tmp_path: Path, capsys) -> None:
    """Resuming a BPE run on other data trained the BPE again and replaced tokenizer.json (its
    checkpoints then paired with another vocabulary); another tokenizer kind is refused."""
    from moekit.cli import main

    run, email = tmp_path / "run", str(Path(JSON_PACKAGE).parent / "email")
    common = [f"--train.data.cache_dir={tmp_path / 'cache'}", "--train.progress=false",
              "--train.eval.batches=1", "--train.batch_size=2", "--train.seq_len=32"]  # fmt: skip
    assert main(["train", "tiny", f"--out={run}", "--train.steps=2", "--train.data.tokenizer=bpe",
                 "--train.data.vocab_size=300", f"--train.data.source={JSON_PACKAGE}",
                 *common]) == 0  # fmt: skip
    tokenizer = (run / "tokenizer.json").read_bytes()
    assert main(["train", "--resume", str(run), "--train.steps=3",
                 f"--train.data.source={email}"]) == 0  # fmt: skip
    assert (run / "tokenizer.json").read_bytes() == tokenizer
    capsys.readouterr()
    whole = RunConfig.from_json((run / "config.json").read_text()).train.data.replace(
        vocab_size=400
    )
    for change in ("--train.data.tokenizer=bytes", "--train.data.vocab_size=400",
                   f"--train.data={json.dumps(whole.to_dict())}"):  # fmt: skip
        assert main(["train", "--resume", str(run), "--train.steps=4", change]) == 2
        assert "changes the tokenizer of" in capsys.readouterr().err
    assert (
        main(["train", "--resume", str(run), "--train.steps=4", "--train.data.tokenizer=run"]) == 0
    )  # what a resumed run reads anyway: taken as said, the run's record kept
    assert (run / "tokenizer.json").read_bytes() == tokenizer
    recorded = RunConfig.from_json((run / "config.json").read_text()).train.data
    assert (recorded.tokenizer, recorded.vocab_size) == ("bpe", 300)


def test_a_resume_from_the_library_keeps_the_runs_tokenizer_and_its_record(tmp_path: Path) -> None:
    """`train(cfg, run, resume=True)` reads the run's tokenizer.json whatever cfg says: a cfg
    naming another tokenizer is refused before anything is written (it rewrote config.json to
    name a tokenizer the run's tokens never came from); tokenizer="run" keeps the record."""
    from moekit.train import train

    run = tmp_path / "run"
    cfg = tiny_run(tmp_path, steps=2, eval=EvalConfig(every=0, batches=1))
    cfg = cfg.replace(model=cfg.model.replace(vocab_size=300))  # room for the BPE below
    train(cfg, run)
    config, tokenizer = (run / "config.json").read_bytes(), (run / "tokenizer.json").read_bytes()
    bpe = cfg.train.data.replace(tokenizer="bpe", vocab_size=300)
    other = cfg.replace(train=cfg.train.replace(steps=3, data=bpe))
    with pytest.raises(ValueError, match=r"is not the tokenizer of .*tokenizer bytes"):
        train(other, run, resume=True)
    assert (run / "config.json").read_bytes() == config
    as_run = cfg.train.data.replace(tokenizer="run", vocab_size=None)
    train(cfg.replace(train=cfg.train.replace(steps=3, data=as_run)), run, resume=True)
    assert (run / "tokenizer.json").read_bytes() == tokenizer
    recorded = RunConfig.from_json((run / "config.json").read_text())
    assert recorded.train.data == cfg.train.data and recorded.train.steps == 3
