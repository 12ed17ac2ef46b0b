"""`moekit <command>`: the one command-line entry point, one module per command.

Each command module holds a `COMMAND` (common.Command): its name, help, arguments and handler.
A command's settings are a config: a preset name or a JSON file plus `--a.b=value` overrides
(common.resolve_config), its resolved config printed and saved where the command writes: train
and demo in the run directories (config.json), analyze beside its report (analyze_config.json),
trace beside the trace (TRACE.config.json), convert and upcycle in the directory they write
(convert_config.json, upcycle_config.json), quantize in its checkpoint (quantization.json);
generate, cache-sim and params write nothing but what they print. What a command reads
(positional, or --from-hf, --to-hf, --prompts) and where it writes (--out) are arguments, not
settings. Each command's usage opens its module's docstring (and `moekit COMMAND -h`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys

import torch

from moekit.cli import (
    analyze,
    cache_sim,
    convert,
    demo,
    experiment,
    generate,
    params,
    quantize,
    trace,
    train,
    upcycle,
)
from moekit.cli.common import CONFIG_HELP, flat_overrides
from moekit.config import ConfigBase, RunConfig
from moekit.cpu_memory import keep_freed_memory
from moekit.distributed import DistributedFailure
from moekit.overrides import check_nothing_lost, split_override
from moekit.train import TrainingDiverged
from moekit.train.lockstep import SideBySideFailed

MODULES = (
    train,
    generate,
    trace,
    cache_sim,
    params,
    convert,
    quantize,
    demo,
    analyze,
    upcycle,
    experiment,
)
COMMANDS = {module.COMMAND.name: module.COMMAND for module in MODULES}
# Errors that are the user's input or machine, printed as one line instead of a traceback: bad
# values, and what the file system said (a missing file, a file in the way, a full disk).
USER_ERRORS = (ValueError, OSError)
# Training that diverged, lost a process or failed in an arm's process: one line, exit 1.
FAILURES = (TrainingDiverged, DistributedFailure, SideBySideFailed)
NUL = "\0"  # in no argument: argv strings are C strings
COMMAND_OPTIONS: dict[str, list[str]] = {}  # each command's option strings (build_parser)
OVERRIDE = re.compile(r"--[\w.]+=")  # and --out=DIR: what argparse keeps gets its spaces back


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        epilog = None
        if cmd.overrides:
            epilog = f"Settings, as overrides with the {cmd.preset!r} preset's values (a preset or "
            epilog += "config JSON gives its own): "
            settings = RunConfig.preset(cmd.preset).to_dict()
            listed = {k: v for k, v in settings.items() if k in cmd.listed}
            own = {f"--{key}": text for key, text in cmd.own}  # what -h says of those
            items = (item.split("=", 1) for item in flat_overrides(listed))
            epilog += " ".join(f"{key}={own.get(key, value)}" for key, value in items)
        if cmd.config is not None:
            epilog = "Settings, as overrides with their defaults: "
            epilog += " ".join(flat_overrides(cmd.config().to_dict()))
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog,
                           allow_abbrev=False)  # fmt: skip
        cmd.configure(p)
        if cmd.config is not None:  # after the command's own positionals
            p.add_argument("config", nargs="?", metavar="CONFIG.json", help=CONFIG_HELP)
        COMMAND_OPTIONS[name] = [o for a in p._actions for o in a.option_strings]
    return parser


def check_arguments(argv: list[str], args: argparse.Namespace) -> None:
    """What no command can use: an argument that is not UTF-8 text (the shell passed bytes), or
    an empty path ("--out=")."""
    for item in argv:
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            shown = item.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise ValueError(f"argument '{shown}' is not UTF-8 text; give text in UTF-8") from None
    for name in ("path", "run_dir", "out", "resume", "from_hf", "to_hf", "prompts"):
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            flag = f"--{name.replace('_', '-')}" if name not in ("path", "run_dir") else name
            raise ValueError(f"{flag} is empty: give a path (an option's default: leave it out)")


def check_setting(item: str, command: str, config: type[ConfigBase]) -> None:
    """An argument the command's parser did not take must be a setting in one argument,
    --key=value (`split_override`); anything else is one error naming it: a stray word, an
    unknown option (a typo of one, say), or a setting of `config` written without its value."""
    if "=" in item or (item.startswith("--") and "." in item):
        split_override(item)  # a malformed key, or a nested setting's missing "=VALUE"
        return
    see = f"`moekit {command} --help` lists its arguments and settings"
    if not item.startswith("-"):
        raise ValueError(
            f"unexpected argument {item!r}: a setting is one argument, --key=value; {see}"
        )
    name = item.lstrip("-")
    fields = [f.name for f in dataclasses.fields(config)]
    if name in fields:
        raise ValueError(f"setting {item!r} has no value: write {item}=VALUE (one argument)")
    options = [o for o in COMMAND_OPTIONS.get(command, []) if o.startswith("--")]
    close = difflib.get_close_matches(item, options, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    if not close and (close := difflib.get_close_matches(name.replace("-", "_"), fields, n=1)):
        hint = f"did you mean --{close[0]}=VALUE? "
    raise ValueError(f"unknown option {item!r}: {hint}{see}")


def allocation_asked(err: BaseException) -> str | None:
    """What an allocation that failed asked for, as " (N GB asked)" ("" where the size is unknown):
    Python's MemoryError, torch's CPU allocator's RuntimeError, torch.OutOfMemoryError. None for
    any other error."""
    text = str(err)  # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: ..."
    if not isinstance(err, MemoryError | torch.OutOfMemoryError) and "allocate memory" not in text:
        return None
    asked = re.search(r"tried to allocate (\d+) bytes", text)
    return f" ({int(asked.group(1)) / 1e9:,.1f} GB asked)" if asked else ""


def _value_of_an_option(before: list[str]) -> bool:
    """Whether the word after `before` is an option's value written without its "=" (`--prompt
    about.json`): the option's own error says so, where the word would be read as a file."""
    return bool(before) and before[-1].startswith("-") and "=" not in before[-1]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes an unknown option with a space (--prompt="def f(") for a positional: hide it
    argv = sys.argv[1:] if argv is None else argv
    argv = [a.replace(" ", NUL) if OVERRIDE.match(a) else a for a in argv]
    args, extra = parser.parse_known_args(argv)
    args.__dict__.update((k, v.replace(NUL, " ")) for k, v in vars(args).items() if type(v) is str)
    args.overrides = extra = [item.replace(NUL, " ") for item in extra]
    cmd = COMMANDS[args.command]
    if cmd.config is not None and args.config is None:  # argparse ends positionals at an option
        late = [item for i, item in enumerate(extra) if item.endswith(".json")
                and not item.startswith("-") and not _value_of_an_option(extra[:i])]  # fmt: skip
        if len(late) == 1:  # `generate RUN --prompt=hi settings.json`: the config file, late
            args.config = late[0]
            extra.remove(late[0])
    if extra and not cmd.overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if cmd.trains:
        keep_freed_memory()
    try:
        check_arguments(argv, args)
        for item in extra:  # before anything is read: `--tokens 256` is a malformed override
            check_setting(item, args.command, cmd.config or RunConfig)
        check_nothing_lost(extra)
        cmd.run(args)
        return 0
    except USER_ERRORS as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FAILURES as err:  # a side-by-side run's error is above, in its process's output
        print(f"\nerror: {err}", file=sys.stderr)  # (RuntimeErrors: before the clause below)
        return 1
    except (MemoryError, RuntimeError) as err:
        asked = allocation_asked(err)
        if asked is None:
            raise
        print(f"moekit {args.command}: error: out of memory{asked}: the settings or input ask for "
              "more than this machine has (sizes, batch, a file read whole); make them smaller",
              file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:  # outside a training loop, or a second Ctrl-C inside one
        print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130
