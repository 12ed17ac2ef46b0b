"""`moekit <command>`: the one command-line entry point, one module per command.

Each command module holds a `COMMAND` (common.Command): its name, help, arguments and handler.
Commands whose settings are a config take a preset name or a JSON file plus `--a.b=value`
overrides (common.resolve_config), print the resolved config and save it beside their outputs.

    moekit train [PRESET|CONFIG.json] [--a.b=value ...] [--out RUN_DIR] [--resume RUN_DIR]
    moekit generate RUN_DIR [CONFIG.json] --prompt="def fib(" --max_new_tokens=200
    moekit analyze RUN_DIR|HF_DIR [CONFIG.json] [--tokens=32768 ...] [--out DIR]
    moekit params PRESET|CONFIG.json [--ep N]
    moekit convert --from-hf DIR --out RUN_DIR
    moekit convert --to-hf RUN_DIR --arch mixtral --out DIR
    moekit demo
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from moekit.cli import (
    analyze,
    cache_sim,
    convert,
    demo,
    experiment,
    generate,
    params,
    trace,
    train,
    upcycle,
)
from moekit.cli.common import flat_overrides
from moekit.cpu_memory import keep_freed_memory
from moekit.overrides import split_override

MODULES = (train, generate, trace, cache_sim, params, convert, demo, analyze, upcycle, experiment)
COMMANDS = {module.COMMAND.name: module.COMMAND for module in MODULES}
# Errors that are the user's input, printed as one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)
HIDDEN_SPACE = "\0"  # no argument holds it (argv strings are C strings)
OVERRIDE = re.compile(r"--[\w.]+=")  # and --out=DIR, whose value has its spaces back
EPILOG = "Config overrides: --a.b=value, e.g. --train.lr=3e-4 --model.moe.top_k=1"


def _unhide(value: Any) -> Any:
    if isinstance(value, list):
        return [_unhide(item) for item in value]
    return value.replace(HIDDEN_SPACE, " ") if isinstance(value, str) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        epilog = EPILOG if cmd.overrides else None
        if cmd.config is not None:
            epilog = "Settings, as overrides with their defaults: "
            epilog += " ".join(flat_overrides(cmd.config().to_dict()))
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog,
                           allow_abbrev=False)  # fmt: skip
        cmd.configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # argparse takes an unknown option with a space (--prompt="def f(") for a positional: hide it
    argv = sys.argv[1:] if argv is None else argv
    hidden = [a.replace(" ", HIDDEN_SPACE) if OVERRIDE.match(a) else a for a in argv]
    args, extra = parser.parse_known_args(hidden)
    for key, value in vars(args).items():
        setattr(args, key, _unhide(value))
    cmd = COMMANDS[args.command]
    args.overrides = extra = _unhide(extra)
    if extra and not cmd.overrides:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if cmd.trains:
        keep_freed_memory()
    try:
        for item in extra:  # before anything is read: `--tokens 256` is a malformed override
            split_override(item)
        return cmd.run(args)
    except USER_ERRORS as err:
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a training loop, or a second Ctrl-C inside one
        print(f"\nmoekit {args.command}: interrupted", file=sys.stderr)
        return 130
