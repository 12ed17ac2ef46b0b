"""What a config field of each type may hold: one rule per type hint.

bool: True or False. int: an integer >= 1, unless its hint gives another interval, as
`Annotated[int, In("[0, inf)")]`. float: a finite number (an int will do) > 0, likewise. str: a
string. `Literal[...]`: one of its values. `X | Y`: what one of the arms allows (`None` included).
`tuple[X, ...]` and `tuple[X, Y]`: a tuple or list (made a tuple) of such items. A config class:
an instance of it. `check_field` raises a `ValueError` naming the field, its value and what the
type allows.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

_BAD = object()  # what a rule returns for a value its type hint does not allow


@dataclass(frozen=True)
class In:
    """The interval a number field lies in, written as in mathematics: `In("[0, 1)")`. A plain
    `int` field is in "[1, inf)", a plain `float` field in "(0, inf)"."""

    interval: str

    @functools.cached_property
    def bounds(self) -> tuple[float, float]:
        low, high = self.interval[1:-1].split(",")
        return _bound(low), _bound(high)

    def holds(self, value: float) -> bool:
        low, high = self.bounds
        above = value >= low if self.interval[0] == "[" else value > low
        below = value <= high if self.interval[-1] == "]" else value < high
        return math.isfinite(value) and above and below

    def phrase(self, kind: type) -> str:
        """ "an integer >= 1", "a number > 0 and finite", "a number in [0, 1)" (a number's
        interval open above says so: inf is > 0, but never holds)."""
        noun = "an integer" if kind is int else "a number"
        if not self.interval.endswith(", inf)"):
            return f"{noun} in {self.interval}"
        low = self.interval[1:].split(",")[0]
        finite = "" if kind is int else " and finite"
        return f"{noun} {'>=' if self.interval[0] == '[' else '>'} {low}{finite}"


def _bound(text: str) -> float:
    """ "0", "inf" or a power such as "2**64"."""
    base, _, power = text.partition("**")
    return float(base) ** float(power or 1)


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


def check_field(name: str, hint: Any, value: Any) -> Any:
    """`value` as field `name` of type `hint` holds it (a list becomes a tuple); a value the hint
    does not allow raises, naming the bad item of a tuple."""
    canonical = rule_of(hint)(value)
    if canonical is not _BAD:
        return canonical
    if typing.get_origin(hint) is Literal:
        check_choice(name, value, typing.get_args(hint))
    if typing.get_origin(hint) is tuple and isinstance(value, (tuple, list)):
        item_hints = _item_hints(typing.get_args(hint), len(value))
        for item_hint, item in zip(item_hints or (), value, strict=False):
            if rule_of(item_hint)(item) is _BAD:
                raise invalid(name, item, f"must be {describe(item_hint)} (each item of {name})")
    rule = describe(hint)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if rule.startswith("a number >") and number:  # a field's own bound reads as it always did
        rule = rule.removeprefix("a number ")  # ("lr='1e-3'": the rule says a number is wanted)
    raise invalid(name, value, f"must be {rule}")


@functools.cache
def rule_of(hint: Any) -> Callable[[Any], Any]:
    """The rule of type `hint`: a value -> the value as a field of that type holds it, or `_BAD`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in DEFAULT_RANGE:
        return rule_of(Annotated[hint, DEFAULT_RANGE[hint]])
    if origin is Annotated:
        return functools.partial(_number, args[0], args[1])
    if origin in (typing.Union, types.UnionType):
        return functools.partial(_union, tuple(rule_of(arm) for arm in args))
    if origin is tuple:
        return functools.partial(_tuple, args)
    if origin is Literal:
        return functools.partial(_literal, args)
    return functools.partial(_instance, hint)  # bool, str, None and nested configs


def _number(kind: type, interval: In, value: Any) -> Any:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and (kind is float or isinstance(value, int)) and interval.holds(value)
    return value if ok else _BAD


def _union(arms: tuple, value: Any) -> Any:
    results = (arm(value) for arm in arms)
    return next((result for result in results if result is not _BAD), _BAD)


def _tuple(args: tuple, value: Any) -> Any:
    item_hints = _item_hints(args, len(value)) if isinstance(value, (tuple, list)) else None
    if item_hints is None:
        return _BAD
    items = tuple(rule_of(h)(item) for h, item in zip(item_hints, value, strict=True))
    return _BAD if any(item is _BAD for item in items) else items


def _literal(choices: tuple, value: Any) -> Any:
    return value if value in choices else _BAD


def _instance(kind: type, value: Any) -> Any:
    return value if isinstance(value, kind) else _BAD


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
