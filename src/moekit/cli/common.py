"""What several commands share: the `Command` record, argparse number types, the config resolver,
its printer and writer, the streaming sampler."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from moekit.config import ConfigBase, ModelConfig, RunConfig, config_from_data
from moekit.fileio import atomic_write_text
from moekit.inference.decode_kernels import apply_decode_kernels
from moekit.overrides import apply_overrides
from moekit.train.sample import sample_text
from moekit.userfiles import read_json

C = TypeVar("C", bound=ConfigBase)
DEFAULT_PRESET = "small"
CONFIG_HELP = "settings as JSON, such as the resolved config it prints (default: the defaults)"
RUN_FILE_IS = "a RunConfig or a ModelConfig, such as the resolved config `moekit train` prints"


@dataclass(frozen=True)
class Command:
    """A subcommand: `configure` adds its arguments to its parser, `run(args)` returns the exit
    status. With `overrides`, its extra arguments are `--a.b=value` config overrides
    (`args.overrides`); with `trains`, its process keeps freed memory for reuse (cpu_memory)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    overrides: bool = False
    trains: bool = False
    config: type[ConfigBase] | None = None  # its settings (CONFIG.json), when not a RunConfig


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
    if spec is not None and (
        spec.endswith(".json") or Path(spec).is_file() or cls is not RunConfig
    ):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"config file {spec} does not exist")
        kind = RUN_FILE_IS if cls is RunConfig else f"{cls.__name__}, as the command prints it"
        remedy = f"fix it: a config file is one JSON object, a {kind}"
        if cls is not RunConfig:
            cfg: Any = cls.from_file(path, remedy)
        elif "model" not in (data := read_json(path, remedy)):
            cfg = RunConfig(model=config_from_data(ModelConfig, data, path))
        else:
            cfg = config_from_data(RunConfig, data, path)
    else:
        cfg = RunConfig.preset(spec or DEFAULT_PRESET) if cls is RunConfig else cls()
    return apply_overrides(cfg, overrides)


def print_config(cfg: ConfigBase, file: TextIO | None = None) -> None:
    print("resolved config:", cfg.to_json(), sep="\n", file=file or sys.stdout, flush=True)


def save_config(cfg: ConfigBase, path: str | Path) -> Path:
    """Write a command's resolved config where its output is (atomically): a file that command
    reads back as its CONFIG.json."""
    atomic_write_text(path, cfg.to_json())
    return Path(path)


def stream_text(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, **sampling: Any
) -> str:
    """Print `prompt` and its continuation by the model (its decode kernels swapped in) as it is
    generated; return the new text."""
    print(prompt, end="", flush=True)
    on_text = lambda text: print(text, end="", flush=True)  # noqa: E731
    model = apply_decode_kernels(model)
    text = sample_text(model, tokenizer, prompt, max_new_tokens, on_text=on_text, **sampling)
    print()
    return text
