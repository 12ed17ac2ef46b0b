"""Training checkpoints: RUN_DIR/checkpoints/step-NNNNNN/, written atomically.

A checkpoint directory holds
    model.safetensors   the model's weights and persistent buffers (the routers' expert biases)
    state.safetensors   the optimizer's tensors ("optimizer.<param>.<name>") and the RNG states
                        ("rng.torch", "rng.cuda", "rng.sampler")
    trainer.json        step, tokens seen, the optimizer's hyper-parameters, schedule position
A quantized model's checkpoint (`write_quantized_run`) holds model.safetensors and the
`quantization.json` it was quantized with instead: it loads for inference, never to train.
Each is written into a hidden temporary directory that is renamed to its final name only once
complete, so an interrupted write leaves the previous checkpoints untouched and nothing under a
checkpoint's name. A checkpoint damaged later (a copy cut short, a bad disk) fails to load with
one `DamagedFile` naming the file and the checkpoint to fall back on.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from moekit.data.tokenizer import copy_chat_files
from moekit.fileio import atomic_path, check_new_path, remove_path
from moekit.quant.files import QUANTIZATION_FILE, dtype_problems, is_quantized
from moekit.train.optim import build_optimizer
from moekit.userfiles import (
    DTYPES,
    REDOWNLOAD,
    CheckpointReader,
    DamagedFile,
    open_safetensors,
    read_json,
    read_safetensors,
    read_tokenizer,
    reading,
)

CHECKPOINT_DIR = "checkpoints"


def is_hf_checkpoint(path: Path) -> bool:
    """Whether `path` holds a Hugging Face checkpoint: its weights beside its config, where a run
    keeps them in CHECKPOINT_DIR (none yet before a run's first checkpoint; a trace file may sit
    beside a run's config)."""
    weights = any(path.glob("*.safetensors*")) or any(path.glob("*.bin"))
    return weights and not (path / CHECKPOINT_DIR).is_dir()


NAME = re.compile(r"step-\d{6,}")


@dataclass
class TrainerState:
    """What a checkpoint restores besides the weights and the optimizer."""

    step: int
    tokens: int
    sampler: dict[str, Tensor]
    torch_rng: Tensor
    cuda_rng: Tensor | None = None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    model_sd: dict[str, Tensor],
    optimizer_sd: dict[str, Any],
    state: TrainerState,
    keep: int,
) -> Path:
    """Write a checkpoint of `state.step` from the whole model's and optimizer's state dicts
    atomically, then delete all but the `keep` newest."""
    final = Path(run_dir) / CHECKPOINT_DIR / f"step-{state.step:06d}"
    for stale in final.parent.glob(".step-*.tmp"):  # left by a write that was killed (SIGKILL)
        remove_path(stale)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        save_file(_one_name_per_tensor(model_sd), str(tmp / "model.safetensors"))
        tensors = _flatten_optimizer(optimizer_sd["state"])
        tensors["rng.torch"] = state.torch_rng
        tensors |= {f"rng.sampler.{k}": v for k, v in state.sampler.items()}
        if state.cuda_rng is not None:
            tensors["rng.cuda"] = state.cuda_rng
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        groups = optimizer_sd["param_groups"]
        meta = {"step": state.step, "tokens": state.tokens, "param_groups": groups}
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=2))
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_path(old)
    return final


def _one_name_per_tensor(model_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict as a safetensors file holds it: a tensor stored under several names (tied
    embeddings) once, under the first name in sorted order, as safetensors' `save_model` keeps it
    (its `load_model` restores the others)."""
    kept: dict[str, Tensor] = {}
    seen = set()
    for name in sorted(model_sd):
        t = model_sd[name]
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and where in seen:
            continue
        seen.add(where)
        kept[name] = t.contiguous()
    return kept


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> TrainerState:
    """Load weights (and optimizer state) from a checkpoint directory into `model` (and
    `optimizer`); returns the rest of the state."""
    path = Path(path)
    load_weights(path, model)
    state, optimizer_sd = read_training_state(path)
    if optimizer is not None:
        with restoring(path, "trainer.json", "optimizer state (with state.safetensors)"):
            optimizer.load_state_dict(optimizer_sd)
    return state


def read_training_state(path: Path) -> tuple[TrainerState, dict[str, Any]]:
    """A checkpoint's trainer state and its optimizer's state dict (of the whole model)."""
    meta = read_trainer_json(path)
    state_file = path / "state.safetensors"
    tensors = read_safetensors(state_file, checkpoint_remedy(path))
    if "rng.torch" not in tensors:
        raise DamagedFile(state_file, "has no 'rng.torch' tensor", checkpoint_remedy(path))
    prefix = "rng.sampler."
    sampler = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    state = TrainerState(
        meta["step"], meta["tokens"], sampler, tensors["rng.torch"], tensors.get("rng.cuda")
    )
    return state, {"state": _unflatten_optimizer(tensors), "param_groups": meta["param_groups"]}


@contextmanager
def restoring(checkpoint: Path, name: str, what: str) -> Iterator[None]:
    """Report what restoring a checkpoint's state raises as the damaged file `name` of it: the
    files read, but do not fit this run (edited, or from another run)."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as err:
        if isinstance(err, DamagedFile):
            raise
        problem = f"holds {what} that does not fit this run ({str(err).splitlines()[0]})"
        raise DamagedFile(Path(checkpoint) / name, problem, checkpoint_remedy(checkpoint)) from None


def load_weights(path: Path, model: nn.Module, may_lack: tuple[str, ...] = ()) -> None:
    """Load only the weights of a checkpoint directory into `model`, the model of its run's
    config.json: names and shapes checked against the file's header first, then each tensor
    streamed into place in slices (`CheckpointReader`), so loading needs the model's memory and a
    bounded margin, not twice the checkpoint (a quantized 30B model is ~19 GB). `model` is whole:
    expert parallelism is applied after loading, as the trainer does (a sharded layer's
    load_state_dict pre-hook, which cuts full tensors to its shard, is not consulted here).
    may_lack: name prefixes ("mtp.1.") whose tensors the file may lack (they keep the model's)."""
    file = Path(path) / "model.safetensors"
    if not is_quantized(model):
        refuse_quantized(path)
    remedy = checkpoint_remedy(path)
    targets = model.state_dict()
    with open_safetensors(file, remedy) as f:
        slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118
        stored = {k: tuple(s.get_shape()) for k, s in slices.items()}
        dtypes = {k: DTYPES.get(s.get_dtype()) for k, s in slices.items()}
    problems = _weight_problems(targets, stored, may_lack)
    problems += dtype_problems(targets, dtypes)
    if problems:
        quantized = (Path(path) / QUANTIZATION_FILE).is_file()
        record = f"config.json and {QUANTIZATION_FILE}" if quantized else "config.json"
        fix = f"restore the {record} the weights were written with"
        if quantized:
            fix += " (or quantize the run again)"
        elif any(n.endswith("_scales") for n in stored):
            fix = (
                f"its tensors are quantized (..._scales): restore the {QUANTIZATION_FILE} that "
                "moekit quantize wrote beside them"
            )
        raise ValueError(
            f"{file} holds the weights of another model than its run's {record} "
            f"{'describe' if quantized else 'describes'} ({'; '.join(problems)}); {fix}"
        )
    reader = CheckpointReader(dict.fromkeys(stored, file))
    try:
        with reading(file, remedy), torch.no_grad():
            for name in stored:
                for rows in reader.row_slices(name):
                    targets[name][rows].copy_(reader.read(name, rows))
    finally:
        reader.close()


def _weight_problems(
    targets: dict[str, Tensor],
    stored: dict[str, tuple[int, ...]],
    may_lack: tuple[str, ...] = (),
) -> list[str]:
    """What keeps a file's tensors ({name: shape}) from loading into `targets`: tensors missing
    (a tensor stored under one of its names, as tied embeddings are, counts for all of them; but
    those named `may_lack`...), unexpected, or of another shape."""
    names_of: dict[int, list[str]] = {}
    for name, t in targets.items():
        if not name.startswith(may_lack):
            names_of.setdefault(t.data_ptr() if t.numel() else id(t), []).append(name)
    missing = [n for names in names_of.values() if not set(names) & stored.keys() for n in names]
    problems = [
        f"size mismatch for {n}: the checkpoint's is {list(shape)}, the model's "
        f"{list(targets[n].shape)}"
        for n, shape in stored.items()
        if n in targets and tuple(targets[n].shape) != shape
    ][:1]
    unexpected = [n for n in stored if n not in targets]
    for kind, names in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if names:
            problems.append(f"{len(names)} {kind}: {', '.join(names[:3])}")
    return problems


def read_trainer_json(path: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint directory, with its step, tokens and param_groups."""
    file = Path(path) / "trainer.json"
    meta = read_json(file, checkpoint_remedy(path))
    fields = {"step": int, "tokens": int, "param_groups": list}
    for name, kind in fields.items():
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            problem = f"has no {name!r} {kind.__name__} (found {meta.get(name)!r})"
            raise DamagedFile(file, problem, checkpoint_remedy(path))
    for name in ("step", "tokens"):
        if meta[name] < 0:
            problem = f"has a negative {name!r} ({meta[name]})"
            raise DamagedFile(file, problem, checkpoint_remedy(path))
    return meta


def refuse_quantized(checkpoint: Path) -> None:
    """Raise ValueError if `checkpoint` holds a quantized model (which trains no more)."""
    if (Path(checkpoint) / QUANTIZATION_FILE).is_file():
        raise ValueError(
            f"{checkpoint} holds a quantized model (moekit quantize): it is for inference "
            "(generate, analyze, convert --to-hf); to train, start from the run it was quantized "
            "from"
        )


def checkpoint_remedy(checkpoint: Path) -> str:
    """What to do about a damaged file of `checkpoint`: fall back on the previous checkpoint."""
    checkpoint = Path(checkpoint)
    found = list_checkpoints(checkpoint.parent.parent)
    others = [p for p in found if p != checkpoint]
    if not others:
        return "it is the run's only checkpoint: copy the run again, or train it anew"
    if found[-1] == checkpoint:
        return (
            f"delete {checkpoint} to fall back on {others[-1].name} (moekit reads a run's newest "
            "checkpoint), or copy the run again"
        )
    return f"delete {checkpoint} (the newer checkpoints do not need it), or copy the run again"


def _flatten_optimizer(state: dict[int, dict[str, Any]]) -> dict[str, Tensor]:
    flat = {}
    for index, entries in state.items():
        for name, value in entries.items():
            tensor = value if isinstance(value, Tensor) else torch.tensor(value)
            flat[f"optimizer.{index}.{name}"] = tensor
    return flat


def _unflatten_optimizer(tensors: dict[str, Tensor]) -> dict[int, dict[str, Tensor]]:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return state


def write_new_run(out_dir: Path, cfg: Any, model: nn.Module, tokenizer: Path | None) -> Path:
    """A run directory (`new_run_dir`) with `model` as a step-0 checkpoint, a fresh optimizer and
    the seed's RNG state, that `moekit train --resume` continues. `cfg` is a `RunConfig`."""
    seeded = torch.Generator().manual_seed(cfg.train.seed).get_state()
    state = TrainerState(0, 0, sampler={"generator": seeded}, torch_rng=seeded.clone())
    with new_run_dir(out_dir, cfg, tokenizer, "choose a new run directory") as tmp:
        optimizer_sd = build_optimizer(model, cfg.train).state_dict()
        save_checkpoint(tmp, model.state_dict(), optimizer_sd, state, keep=1)
    return Path(out_dir)


def write_quantized_run(
    out: Path, cfg: Any, model: nn.Module, quantization: Any, tokenizer: Path | None
) -> Path:
    """A run directory (`new_run_dir`) of a quantized model (`moekit quantize`): one checkpoint of
    the model's weights with the `QuantizeConfig` it was quantized with (`quantization.json`), no
    optimizer state (it is for inference)."""
    with new_run_dir(out, cfg, tokenizer, "choose a new directory for the quantized model") as tmp:
        checkpoint = tmp / CHECKPOINT_DIR / "step-000000"
        checkpoint.mkdir(parents=True)
        save_file(_one_name_per_tensor(model.state_dict()), str(checkpoint / "model.safetensors"))
        (checkpoint / QUANTIZATION_FILE).write_text(quantization.to_json() + "\n")
    return Path(out)


@contextmanager
def new_run_dir(out: Path, cfg: Any, tokenizer: Path | None, remedy: str) -> Iterator[Path]:
    """Write a new run directory atomically: config.json, `tokenizer` (the tokenizer.json of a
    run or a Hugging Face checkpoint) when given with the chat files beside it (its template,
    special tokens and end tokens: `copy_chat_files`), and what the caller writes into
    the folder yielded. An existing `out` is refused (`remedy`: what to do)."""
    out = Path(out)
    check_new_path(out, remedy)
    if tokenizer is not None:  # one that does not read is refused here, not copied in
        read_tokenizer(tokenizer, f"restore {Path(tokenizer).name} ({REDOWNLOAD})")
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(cfg.to_json() + "\n")
        if tokenizer is not None:
            shutil.copy2(tokenizer, tmp / "tokenizer.json")
            copy_chat_files(Path(tokenizer).parent, tmp)
        yield tmp
