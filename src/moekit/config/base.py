"""`ConfigBase`: a config dataclass whose fields are checked against their type hints (rules.py),
then against one another by the class's own `check`; its JSON round trip.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

from moekit.config.rules import check_field, rule_of
from moekit.userfiles import read_json

C = TypeVar("C", bound="ConfigBase")


class ConfigBase:
    """Base of the config dataclasses (`@dataclass(kw_only=True)`): checks every field against its
    type hint, then the class's own cross-field rules (`check`); JSON round trip."""

    def __post_init__(self) -> None:
        for name, hint in _hints(type(self)).items():
            value = getattr(self, name)
            if rule_of(hint)(value) is not value:  # a list to make a tuple, or a value to refuse
                setattr(self, name, check_field(name, hint, value))
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
        kwargs = dict(data)
        for key, value in data.items():
            nested = _config_class(_hints(cls)[key])
            if nested is None or not isinstance(value, dict):
                continue
            try:
                kwargs[key] = nested.from_dict(value)
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
        return config_from_data(cls, read_json(path, remedy, unique_keys=True), path)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def config_from_data(cls: type[C], data: Any, path: str | Path) -> C:
    """`cls.from_dict(data)` of the JSON read from `path`; its errors name the file."""
    try:
        return cls.from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


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
