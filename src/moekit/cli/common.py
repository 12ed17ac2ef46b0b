"""What several commands share: the `Command` record, `positive_int`, the config resolver and its
printer, the streaming sampler."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TextIO, TypeVar

import torch
from tokenizers import Tokenizer

from moekit.config import (
    MODEL_PRESETS,
    RUN_PRESETS,
    ConfigBase,
    ModelConfig,
    RunConfig,
    config_from_data,
)
from moekit.data import eos_id
from moekit.fileio import check_writable_file
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.interop.chat import ChatPrompt
from moekit.interop.hf import is_transformers_config
from moekit.loading import is_hf_directory
from moekit.model import MoETransformer, generate
from moekit.model.generation import end_token_ids, room_after_prompt
from moekit.overrides import apply_overrides
from moekit.train.checkpoint import CHECKPOINT_DIR, is_hf_checkpoint
from moekit.userfiles import read_json

C = TypeVar("C", bound=ConfigBase)
DEFAULT_PRESET = "small"
CONFIG_HELP = "settings as JSON, such as the resolved config it prints (default: the defaults)"
RUN_FILE_IS = "a RunConfig or a ModelConfig, such as the resolved config `moekit train` prints"


def check_prompt_room(tokenizer: Tokenizer, prompt: str, max_seq_len: int, what: str) -> None:
    """`room_after_prompt` for `prompt` as `stream_text` feeds it (an empty prompt is one token,
    the end of text that starts a new document): ValueError naming `what` if it leaves none."""
    room_after_prompt(len(tokenizer.encode(prompt).ids) or 1, max_seq_len, what)


@contextlib.contextmanager
def warnings_as_notes(category: type[Warning] = Warning) -> Iterator[None]:
    """The warnings of `category` raised inside, each printed afterwards as one `note:` line on
    stderr (a command's own notes, e.g. prefetch standing down); any other warning as Python
    shows it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield
    for warning in caught:
        if issubclass(warning.category, category):
            print(f"note: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename,
                                 warning.lineno)  # fmt: skip


@dataclass(frozen=True)
class Command:
    """A subcommand: `configure` adds its arguments to its parser, `run(args)` does the work (a
    failure raises: `main` gives the exit status). With `overrides`, its extra arguments are
    `--a.b=value` config overrides (`args.overrides`); with `trains`, its process keeps freed
    memory for reuse (cpu_memory)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]
    overrides: bool = False
    trains: bool = False
    config: type[ConfigBase] | None = None  # its settings (CONFIG.json), when not a RunConfig
    preset: str = DEFAULT_PRESET  # the RunConfig preset whose settings -h lists (`overrides`)
    listed: tuple[str, ...] = ("model", "train", "parallel")  # the settings it takes
    own: tuple[tuple[str, str], ...] = ()  # (setting, what -h says) of those it sets itself


def flat_overrides(data: dict[str, Any], prefix: str = "--") -> list[str]:
    """A config's dict as the `--a.b=value` overrides that set each field to its value."""
    return [item for key, value in data.items() for item in (
        flat_overrides(value, f"{prefix}{key}.") if isinstance(value, dict)
        else [f"{prefix}{key}={override_text(value)}"])]  # fmt: skip


def override_text(value: Any) -> str:
    """A field's value as an override writes it: a list as 1,2,3 (JSON when nested), () as none."""
    if not isinstance(value, (tuple, list)):
        return str(value)
    if not value:
        return "none"
    if any(isinstance(item, (tuple, list, dict)) for item in value):
        return json.dumps(value)
    return ",".join(map(str, value))


def results_file(text: str) -> Path:
    """An argparse type for a file to write at the end (a benchmark's --out): checked before the
    work (`fileio.check_writable_file`), so a path that cannot be written costs no run."""
    try:
        check_writable_file(text)
    except OSError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return Path(text)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1; else argparse reports "argument --flag: must be an
    integer >= 1, not TEXT" and exits 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text}")
    return value


def resolve_config(cls: type[C], spec: str | None, overrides: Sequence[str]) -> C:
    """A `cls` config from a preset name or a JSON file, with `--a.b=value` overrides applied.
    Without `spec`: a RunConfig is the preset DEFAULT_PRESET, any other the class's defaults. A
    RunConfig's file may hold a bare ModelConfig; only a RunConfig has presets."""
    if spec is not None and not spec.strip():
        raise ValueError(f"the config argument is empty: give {_config_is(cls)}")
    presets = (*MODEL_PRESETS, *RUN_PRESETS) if cls is RunConfig else ()
    if spec is not None and spec not in presets and Path(spec).is_dir():  # a folder ./tiny: tiny
        raise ValueError(directory_given(Path(spec), cls))
    if spec is not None and (
        spec.endswith(".json") or Path(spec).is_file() or cls is not RunConfig
    ):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config file {spec} does not exist")
        kind = RUN_FILE_IS if cls is RunConfig else f"a {cls.__name__}, as the command prints it"
        remedy = f"fix it: a config file is one JSON object, {kind}"
        if cls is not RunConfig:
            data = read_json(path, remedy, unique_keys=True)
            if isinstance(data, dict) and {"model", "train"} <= data.keys():  # RUN/config.json
                raise ValueError(
                    f"{path} is a run's config (model, train), not {cls.__name__}'s settings: "
                    "the run brings its own; leave it out, or give a file of the settings "
                    "`-h` lists (the resolved config this command prints)"
                )
            cfg: Any = cls.from_file(path, remedy)
        elif "model" not in (data := read_json(path, remedy, unique_keys=True)):
            if is_transformers_config(data):
                raise ValueError(
                    f"{path} is a Hugging Face model's config, not a moekit one: convert its "
                    f"checkpoint to a run (moekit convert --from-hf {path.parent} --out RUN_DIR), "
                    "then give RUN_DIR/config.json"
                )
            cfg = RunConfig(model=config_from_data(ModelConfig, data, path))
        else:
            cfg = config_from_data(RunConfig, data, path)
    else:
        cfg = RunConfig.preset(spec or DEFAULT_PRESET) if cls is RunConfig else cls()
    return apply_overrides(cfg, overrides)


def _config_is(cls: type[ConfigBase]) -> str:
    """What a command's config argument is."""
    if cls is RunConfig:
        return "a preset or a JSON config file (such as a run's config.json)"
    return f"a JSON file of a {cls.__name__}, as the command prints it"


def directory_given(path: Path, cls: type[ConfigBase]) -> str:
    """The error for a directory given as a config: what it is and what to give instead."""
    if cls is not RunConfig:
        return f"config file {path} is a directory; give a JSON file"
    config, said = path / "config.json", f"{path} is a directory, not a config"
    if is_hf_checkpoint(path) or (config.is_file() and is_hf_directory(path)):  # load's test
        return (
            f"{path} is a Hugging Face checkpoint, not a config: convert it to a run first "
            f"(moekit convert --from-hf {path} --out RUN_DIR)"
        )
    if not config.is_file():
        return f"{said}: give {_config_is(cls)}"
    if not (path / CHECKPOINT_DIR).is_dir():
        return f"{said}: give its config file, {config}"
    resume = f"moekit train --resume {path}"  # a run directory
    return f"{said}: give its settings, {config} (to continue that run: {resume})"


def print_config(cfg: ConfigBase, file: TextIO | None = None) -> None:
    print("resolved config:", cfg.to_json(), sep="\n", file=file, flush=True)


class Streamed(NamedTuple):
    """What `stream_text` generated: the text shown, the new ids, and whether the model's context
    (max_seq_len) cut it before max_new_tokens and before an end token."""

    text: str
    ids: list[int]
    cut_by_context: bool


def stream_text(
    model: MoETransformer,
    tokenizer: Tokenizer,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int = 0,
    chat: ChatPrompt | None = None,
    **generate_args: Any,
) -> Streamed:
    """Print `prompt` and its continuation by the model (its decode kernels swapped in) as it is
    generated, up to `max_new_tokens` tokens (fewer at end-of-text or max_seq_len); return the
    new text and ids. With `chat` (the conversation rendered, `moekit.interop.chat`), the model
    answers it instead and only the reply is printed, up to the chat's end tokens.
    `generate_args`: generate's speculative, draft_tokens and stats, or kv_cache (a chat's)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    view = tokenizer.decode  # new ids -> the text shown
    if chat is not None:
        ids, eos, prompt, view = chat.ids, chat.end_ids, "", chat.reply_text
    else:
        eos = eos_id(tokenizer)
        ids = tokenizer.encode(prompt).ids or [eos]  # an empty prompt starts a new document
    cache = generate_args.get("kv_cache")
    past = 0 if cache is None else cache.length
    what = "the conversation" if past else "the prompt"
    budget = min(max_new_tokens, room_after_prompt(past + len(ids), model.cfg.max_seq_len, what))
    print(prompt, end="", flush=True)
    new_ids: list[int] = []
    shown = ""

    def stream(ids_B: torch.Tensor) -> None:
        """Print the text of new token ids as they come. Decoding the whole continuation each
        time keeps multi-byte characters whole: text ending in an incomplete character waits for
        the next token."""
        nonlocal shown
        new_ids.append(int(ids_B[0]))
        text = view(new_ids)
        if text.endswith("\ufffd") or len(text) <= len(shown):
            return
        print(text[len(shown) :], end="", flush=True)
        shown = text

    generate(
        apply_decode_kernels(model),
        torch.tensor([ids]),
        budget,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos,
        generator=torch.Generator().manual_seed(seed),
        stream=stream,
        **generate_args,
    )
    print()
    ended = bool(new_ids) and new_ids[-1] in end_token_ids(eos)
    if chat is not None and not shown and new_ids and not ended:
        note = f"the reply, cut at {len(new_ids)} new tokens, holds no answer yet (a reasoning"
        note += " model answers after it reasons): raise --max_new_tokens"
        print(f"note: {note}", file=sys.stderr)
    return Streamed(shown, new_ids, len(new_ids) == budget < max_new_tokens and not ended)
