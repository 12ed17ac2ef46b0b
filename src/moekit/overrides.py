"""`--a.b=value` overrides of nested config dataclasses, typed by the fields they set.

    apply_overrides(RunConfig.preset("small"), ["--train.lr=3e-4", "--model.moe.top_k=1"])

Each value is parsed according to the type hint of the field it sets (bool, int, float, str,
Literal, Optional, tuples, nested configs as JSON); the result is rebuilt through `from_dict`, so
it is validated like any config. An unknown key is an error that names it and lists the fields.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, Literal, TypeVar

from moekit.config import ConfigBase
from moekit.userfiles import json_problem

C = TypeVar("C", bound=ConfigBase)
NONE_WORDS = ("none", "null")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


def apply_overrides(cfg: C, overrides: Sequence[str]) -> C:
    """A copy of `cfg` with each "--a.b=value" of `overrides` applied, validated."""
    data = cfg.to_dict()
    for item in overrides:
        key, text = split_override(item)
        _set(type(cfg), data, key.split("."), text, key)
    return type(cfg).from_dict(data)


def check_nothing_lost(overrides: Iterable[str]) -> None:
    """A user's settings: a setting after one inside it (--model.moe.top_k=1 --model.moe=null)
    would drop the first, unseen: ValueError naming both. The same key twice is the last one's,
    as with options (a script's defaults, then the user's); a setting whole, then one inside it,
    is the way to fill a None (--model.moe='{...}' --model.moe.top_k=1)."""
    given: list[str] = []
    for item in overrides:
        key = split_override(item)[0]
        lost = [k for k in given if k.startswith(f"{key}.")]
        if lost:
            raise ValueError(
                f"--{key} is given after --{lost[0]}, which it would drop: give --{key} first, or "
                f"leave out --{lost[0]}"
            )
        given.append(key)


def touches(key: str, names: Iterable[str]) -> bool:
    """Whether an override of `key` ("model.moe") sets one of the settings `names`, a part of one,
    or a setting that holds one."""
    return any(n == key or n.startswith(f"{key}.") or key.startswith(f"{n}.") for n in names)


def split_override(item: str) -> tuple[str, str]:
    """ "--a.b=value" -> ("a.b", "value")."""
    body = item[2:] if item.startswith("--") else item
    key, sep, text = body.partition("=")
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} is malformed: write --key.subkey=value")
    if not sep:
        raise ValueError(f"override {item!r} has no value: write {item}=VALUE (one argument)")
    return key, text


def _set(cls: type, data: dict[str, Any], parts: list[str], text: str, key: str) -> None:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    name = parts[0]
    if name not in names:
        raise ValueError(
            f"unknown config key --{key}: {cls.__name__} has no field {name!r}; "
            f"its fields are {', '.join(names)}"
        )
    if len(parts) == 1:
        value = parse_value(hints[name], text, key)
        data[name] = value.to_dict() if isinstance(value, ConfigBase) else value
        return
    sub = _config_class(hints[name])
    if sub is None:
        raise ValueError(f"unknown config key --{key}: {name!r} is a value, not a nested config")
    if data[name] is None:
        prefix = key.rsplit(".", len(parts) - 1)[0]
        raise ValueError(
            f"cannot set --{key}: {prefix} is None; set it whole first, e.g. "
            f"--{prefix}='{{\"...\": ...}}' (JSON)"
        )
    _set(sub, data[name], parts[1:], text, key)


def parse_value(hint: Any, text: str, key: str) -> Any:
    """Parse the text of --key=text as the type `hint` of its field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _parse_union(args, text, key)
    if origin is Literal:
        return _parse_literal(args, text, key)
    if origin in (tuple, list):
        return _parse_sequence(origin, args, text, key)
    if isinstance(hint, type) and issubclass(hint, ConfigBase):
        data = _json(text, key)
        if not isinstance(data, dict):
            raise ValueError(
                f"--{key}={text!r}: expected a JSON object of {hint.__name__}'s fields, or set "
                f"one at a time: --{key}.FIELD=VALUE"
            )
        return hint.from_dict(data)
    if hint is bool:
        return _parse_bool(text, key)
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"--{key}={text!r}: expected {hint.__name__}") from None
    return _json(text, key) if hint is Any else text


def _parse_union(args: tuple, text: str, key: str) -> Any:
    # "none" is None, unless an arm's choices hold the word itself (quantize's --experts=none:
    # the scheme "none", float; null still leaves it unset)
    spelt = any(typing.get_origin(a) is Literal and text in typing.get_args(a) for a in args)
    if type(None) in args and text.lower() in NONE_WORDS and not spelt:
        return None
    arms = [a for a in args if a is not type(None)]
    arms.sort(key=lambda a: a is str)  # a plain string accepts anything: try it last
    for arm in arms:
        try:
            return parse_value(arm, text, key)
        except ValueError as err:
            if _config_class(arm) is not None and text.lstrip().startswith("{"):  # its JSON
                said = str(err)  # what the config (or the JSON) says is wrong with it
                raise ValueError(
                    said if said.startswith(f"--{key}=") else f"--{key}={text!r}: {said}"
                ) from None
            continue
    allowed = " or ".join(_type_name(a) for a in args)
    raise ValueError(f"--{key}={text!r}: expected {allowed}")


def _parse_literal(choices: tuple, text: str, key: str) -> Any:
    for choice in choices:
        if str(choice) == text or (choice is None and text.lower() in NONE_WORDS):
            return choice
    raise ValueError(f"--{key}={text!r}: allowed values are {', '.join(map(repr, choices))}")


def _parse_sequence(origin: type, args: tuple, text: str, key: str) -> Any:
    if text.lower() in NONE_WORDS:  # an empty list, as --train.freeze=none was before it was one
        return () if origin is tuple else []
    raw = _json(text, key) if text.startswith("[") else [t for t in text.split(",") if t]
    if not isinstance(raw, list):
        raise ValueError(f"--{key}={text!r}: expected a list such as 1,2,3 or [1, 2, 3]")
    elem = args[0] if args else Any
    items = [parse_value(elem, str(x) if not isinstance(x, str) else x, key) for x in raw]
    return tuple(items) if origin is tuple else items


def _parse_bool(text: str, key: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise ValueError(f"--{key}={text!r}: expected true or false")


def _json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where = f"{json_problem(err)} at character {err.pos + 1}"
        raise ValueError(f"--{key}={text!r}: expected JSON ({where})") from None


def _config_class(hint: Any) -> type | None:
    """The config class a (possibly Optional) field holds, or None for plain values."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) else (hint,)
    for arm in candidates:
        if isinstance(arm, type) and issubclass(arm, ConfigBase):
            return arm
    return None


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if hint is type(None):
        return "none"
    if origin is Literal:
        return " or ".join(repr(c) for c in typing.get_args(hint))
    if origin in (tuple, list):
        return "a list such as 1,2,3"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
