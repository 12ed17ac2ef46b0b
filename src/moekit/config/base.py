"""`ConfigBase`: a config dataclass checked against its own type hints, and its JSON round trip.

Every field is checked by one rule per type: bool (True or False), int (an integer >= 1 unless its
hint says otherwise, as `Annotated[int, In("[0, inf)")]`), float (a finite number > 0, likewise),
str, `Literal[...]`, `X | Y` (one of the arms, `None` included), `tuple[X, ...]` (a list is made a
tuple) and nested configs. A bad value raises `ValueError` naming the field, the value and what
is allowed. Rules that relate fields to one another are written by hand in each class's `check`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from moekit.userfiles import read_json

C = TypeVar("C", bound="ConfigBase")
_BAD = object()  # what `_canonical` returns for a value its type hint does not allow


@dataclass(frozen=True)
class In:
    """The interval a number field lies in, written as in mathematics: `In("[0, 1)")`. A plain
    `int` field is in "[1, inf)", a plain `float` field in "(0, inf)"."""

    interval: str

    def holds(self, value: float) -> bool:
        low, high = (float(end) for end in self.interval[1:-1].split(","))
        above = value >= low if self.interval[0] == "[" else value > low
        below = value <= high if self.interval[-1] == "]" else value < high
        return math.isfinite(value) and above and below

    def phrase(self, kind: type) -> str:
        """ "an integer >= 1", "a number > 0", "a number in [0, 1)"."""
        noun = "an integer" if kind is int else "a number"
        if not self.interval.endswith(", inf)"):
            return f"{noun} in {self.interval}"
        low = self.interval[1:].split(",")[0]
        return f"{noun} {'>=' if self.interval[0] == '[' else '>'} {low}"


NonNegInt = Annotated[int, In("[0, inf)")]
NonNegFloat = Annotated[float, In("[0, inf)")]
DEFAULT_RANGE = {int: In("[1, inf)"), float: In("(0, inf)")}


def invalid(name: str, value: Any, rule: str) -> ValueError:
    """The error for field `name` holding `value`, which breaks `rule` ("must be ...")."""
    return ValueError(f"{name}={value!r} is invalid: {rule}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    """Raise unless `value` is one of `choices`."""
    if value not in choices:
        raise invalid(name, value, f"allowed values are {', '.join(repr(c) for c in choices)}")


class ConfigBase:
    """Base of the config dataclasses (`@dataclass(kw_only=True)`): checks every field against its
    type hint, then the class's own cross-field rules (`check`); JSON round trip."""

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            setattr(self, name, check_field(name, hint, getattr(self, name)))
        self.check()

    def check(self) -> None:
        """Rules between fields, written by each class that has some; raise `invalid(...)`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build from a dict as `to_dict` writes it; unknown and missing keys are an error."""
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} is a JSON object of its fields, not {data!r}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        names = {f.name for f in fields}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(names)}")
        missing = [f.name for f in fields if f.name not in data and _required(f)]
        if missing:
            raise ValueError(f"{cls.__name__} needs the field(s) {missing}")
        kwargs = {}
        for key, value in data.items():
            nested = _config_class(_hints(cls)[key])
            try:
                kwargs[key] = (
                    nested.from_dict(value) if isinstance(value, dict) and nested else value
                )
            except ValueError as err:  # a nested config's error names the path to its field
                raise ValueError(_with_path(key, str(err))) from None
        return cls(**kwargs)

    @classmethod
    def from_json(cls: type[C], text: str) -> C:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_file(cls: type[C], path: str | Path, remedy: str) -> C:
        """Read a config JSON file a user handed us: a file that is not JSON, or a config whose
        fields are wrong, is one `ValueError` naming the file (and the position or the field);
        `remedy` says what to do about a file that is not JSON."""
        return config_from_data(cls, read_json(path, remedy), path)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def config_from_data(cls: type[C], data: Any, path: str | Path) -> C:
    """`cls.from_dict(data)` of the JSON read from `path`; its errors name the file."""
    try:
        return cls.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def check_field(name: str, hint: Any, value: Any) -> Any:
    """`value` as field `name` of type `hint` holds it (a list becomes a tuple); a value the hint
    does not allow raises, naming the bad item of a tuple."""
    canonical = _canonical(hint, value)
    if canonical is not _BAD:
        return canonical
    if typing.get_origin(hint) is tuple and isinstance(value, (tuple, list)):
        item_hints = _item_hints(typing.get_args(hint), len(value))
        for item_hint, item in zip(item_hints or (), value, strict=False):
            if _canonical(item_hint, item) is _BAD:
                raise invalid(name, item, f"must be {describe(item_hint)} (each item of {name})")
    raise invalid(name, value, f"must be {describe(hint)}")


def _canonical(hint: Any, value: Any) -> Any:
    """`value` as a field of type `hint` holds it, or `_BAD`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in DEFAULT_RANGE:
        return _canonical(Annotated[hint, DEFAULT_RANGE[hint]], value)
    if origin is Annotated:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind_ok = number and (args[0] is float or isinstance(value, int))
        return value if kind_ok and args[1].holds(value) else _BAD
    if origin in (typing.Union, types.UnionType):
        arms = (_canonical(arm, value) for arm in args)
        return next((arm for arm in arms if arm is not _BAD), _BAD)
    if origin is tuple:
        item_hints = _item_hints(args, len(value)) if isinstance(value, (tuple, list)) else None
        if item_hints is None:
            return _BAD
        items = tuple(_canonical(h, item) for h, item in zip(item_hints, value, strict=True))
        return _BAD if any(item is _BAD for item in items) else items
    if origin is Literal:
        return value if value in args else _BAD
    return value if isinstance(value, hint) else _BAD  # bool, str, None and nested configs


def describe(hint: Any) -> str:
    """What a field of type `hint` may hold, as the end of "must be ..."."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in DEFAULT_RANGE:
        return DEFAULT_RANGE[hint].phrase(hint)
    if origin is Annotated:
        return args[1].phrase(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arm) for arm in args)
    if origin is tuple and args[-1] is Ellipsis:
        return f"a list, each item {describe(args[0])}"
    if origin is tuple:
        return f"a list of {len(args)}: " + ", ".join(describe(arm) for arm in args)
    if origin is Literal:
        return repr(args[0]) if len(args) == 1 else "one of " + ", ".join(map(repr, args))
    names = {bool: "True or False", str: "a string", type(None): "None"}
    return names.get(hint) or f"a {hint.__name__}"


def _item_hints(args: tuple, length: int) -> tuple | None:
    """The hint of each of `length` items of a `tuple[args]`, or None for a wrong length."""
    if args[-1] is Ellipsis:
        return (args[0],) * length
    return args if len(args) == length else None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: hints[name] for name in names}


def _config_class(hint: Any) -> type[ConfigBase] | None:
    """The config class a (possibly optional) field holds, or None for plain values."""
    for arm in typing.get_args(hint) or (hint,):
        if isinstance(arm, type) and issubclass(arm, ConfigBase):
            return arm
    return None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _with_path(key: str, message: str) -> str:
    """`top_k=9 is invalid...` raised inside field `moe` -> `moe.top_k=9 is invalid...`."""
    if re.match(r"[A-Za-z_][\w.]*(=|: )", message):
        return f"{key}.{message}"
    return f"{key}: {message}"
