"""The checks a run directory passes before a run starts in it: a new run refuses a run's or
anyone's files it would overwrite (a run stopped before its first checkpoint trains again), a
resumed one damaged files and a run with nothing left to train (`check_run_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.config import RunConfig
from moekit.data.tokenizer import CHAT_FILES
from moekit.fileio import check_no_file_in_the_way
from moekit.train.checkpoint import (
    CHECKPOINT_DIR,
    checkpoint_remedy,
    latest_checkpoint,
    read_trainer_json,
    refuse_quantized,
)
from moekit.train.metrics import read_metrics
from moekit.train.sample import read_run_config
from moekit.userfiles import open_safetensors


def check_run_dir(
    run_dir: Path,
    resume: bool,
    steps: int | None = None,
    recorded: int | None = None,
    tokenizer: str | None = None,
) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite a run, to
    resume from damaged files and, given the run's `steps` (train.steps), to resume a run that
    has trained them all (before anything is written; `recorded`: its config.json's
    train.steps, for the message, `nothing_to_train`; `tokenizer`: a new run's
    train.data.tokenizer, `check_no_other_files`)."""
    check_no_file_in_the_way(run_dir)
    latest = latest_checkpoint(run_dir)
    if resume and latest is None:
        raise FileNotFoundError(f"cannot resume: {run_dir} has no checkpoint in checkpoints/")
    if resume and latest is not None:  # DamagedFile unless its files read (headers, trainer.json)
        refuse_quantized(latest)
        step = read_trainer_json(latest)["step"]
        for name in ("model.safetensors", "state.safetensors"):
            with open_safetensors(latest / name, checkpoint_remedy(latest)):
                pass
        read_metrics(run_dir / "metrics.jsonl")
        if steps is not None and step >= steps:  # (after the damage: that is named first)
            raise ValueError(nothing_to_train(run_dir, step, steps, recorded))
    if not resume and latest is not None:
        raise FileExistsError(
            f"{run_dir} already holds a run (checkpoint {latest.name}); continue it with "
            f"`moekit train --resume {run_dir}` or choose another --out"
        )
    if not resume:
        check_no_other_files(run_dir, tokenizer)
    return latest if resume else None


# What a run writes before its first checkpoint (config.json last): a folder of these alone is a
# run that stopped there. Its tokenizer files are a run's only beside its other files (or where
# train.data.tokenizer="run" reads a tokenizer.json prepared for it); alone, they may be a
# Hugging Face tokenizer the run would replace.
RUN_FILES = ("metrics.jsonl", "tensorboard", CHECKPOINT_DIR)
RUN_TOKENIZER_FILES = ("tokenizer.json", *CHAT_FILES)


def check_no_other_files(run_dir: Path, tokenizer: str | None = None) -> None:
    """A new run writes config.json, tokenizer.json and report.md into `run_dir`: refuse a folder
    that holds anything but what a run writes before its first checkpoint (RUN_FILES, a
    config.json of a run, and beside either its tokenizer files), such as a Hugging Face
    checkpoint or tokenizer or a user's own files, which it would overwrite. `tokenizer`: the
    run's train.data.tokenizer ("run" reads the folder's tokenizer.json: it is the run's)."""
    if not run_dir.is_dir():
        return
    names = {path.name for path in run_dir.iterdir()}
    run_config = "config.json" in names and _is_run_config(run_dir / "config.json")
    if run_config or names & set(RUN_FILES) or tokenizer == "run":
        names -= {"config.json", *RUN_TOKENIZER_FILES} if run_config else set(RUN_TOKENIZER_FILES)
    names -= set(RUN_FILES)
    if not names:
        return
    shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
    raise FileExistsError(
        f"{run_dir} holds files that are not a moekit run's ({shown}), beside which a new run "
        "would write its own config.json and report.md: choose a new --out (or an empty folder)"
    )


def with_run_tokenizer(run_dir: Path, cfg: RunConfig, resumed: bool) -> tuple[RunConfig, bool]:
    """(cfg, whether the run keeps its tokenizer.json). A `resumed` run holding a tokenizer.json
    reads and keeps it (a BPE trained again would differ), and cfg takes the tokenizer and
    vocab_size its config.json records, so the config.json it writes still says which tokenizer
    made its tokens: train.data.tokenizer="run" (what it reads anyway) takes them; any other
    tokenizer or vocab_size than the recorded is refused, naming both (`moekit train --resume`
    names the override first, cli.train.check_tokenizer_kept)."""
    if not (resumed and (run_dir / "tokenizer.json").is_file()):
        return cfg, False
    if not (run_dir / "config.json").is_file():  # nothing recorded to keep
        return cfg, True
    recorded = read_run_config(run_dir).train.data
    data = cfg.train.data
    kept = (recorded.tokenizer, recorded.vocab_size)
    if data.tokenizer != "run" and (data.tokenizer, data.vocab_size) != kept:
        raise ValueError(
            f"train.data.tokenizer={data.tokenizer}, vocab_size={data.vocab_size} is not the "
            f"tokenizer of {run_dir} (tokenizer {kept[0]}, vocab_size {kept[1]}): a resumed run "
            "keeps its tokenizer (its tokenizer.json); resume with its own settings (or "
            'train.data.tokenizer="run")'
        )
    data = data.replace(tokenizer=recorded.tokenizer, vocab_size=recorded.vocab_size)
    return cfg.replace(train=cfg.train.replace(data=data)), True


def nothing_to_train(run_dir: Path, step: int, steps: int, recorded: int | None = None) -> str:
    """Why resuming `run_dir`, at `step`, with train.steps=`steps` (<= step) trains nothing;
    `recorded`: the train.steps of its config.json, when known and other than `steps`."""
    if recorded is None and step > steps:
        where = f"is at step {step}"
    else:
        recorded = steps if recorded is None else recorded
        at = f"step {step} of {recorded}"
        where = f"is finished ({at})" if step >= recorded else f"is at {at}"
    given = "" if steps == recorded else f" with train.steps={steps}"
    return (
        f"{run_dir} {where}: nothing to train{given}; raise --train.steps above {step} to "
        f"continue (moekit train --resume {run_dir} --train.steps=N)"
    )


def _is_run_config(path: Path) -> bool:
    """Whether `path` is a run's config.json (a RunConfig's keys), not someone else's."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "train"} <= data.keys()
