"""Typed conversion of one config section (a dict or ``ConfigDict``) into its frozen
dataclass: the one rule every section follows (``rope_jax.config_boundary``).

An unknown key is an error naming ``<section>.<key>`` and its close matches; a value whose
type is not the field's is an error naming the key, the type wanted and the value given.
Conversions allowed: an int where a float is wanted, a list where a tuple is. ``None`` is
accepted only by fields typed ``X | None`` ("unset": derived, or off, as the field says).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """A model-config field that a component declares (an attention kernel, a position
    encoding); ``ModelConfig`` gathers them from the registries.

    ``choices`` (if any) lists the allowed values; ``minimum`` bounds numbers from below.
    """

    name: str
    type: type
    default: Any
    doc: str
    choices: tuple = ()
    minimum: float | None = None

    def check(self, value) -> None:
        if self.choices and value not in self.choices:
            raise ValueError(
                f"{self.name}={value!r} is not one of {', '.join(map(str, self.choices))}."
            )
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{self.name} must be >= {self.minimum}, got {value!r}.")


class ConfigKeyError(ValueError):
    """A config key that does not exist or holds a value of the wrong type."""


def _allowed(hint) -> tuple[tuple, bool]:
    """(concrete types, whether None is allowed) of a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        concrete = tuple(a for a in args if a is not type(None))
        return tuple(typing.get_origin(a) or a for a in concrete), type(None) in args
    return (origin or hint,), False


def _coerce(value: Any, wanted: tuple, key: str, section: str) -> Any:
    if float in wanted and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in wanted and isinstance(value, list):
        return tuple(value)
    ok = isinstance(value, wanted) and not (
        isinstance(value, bool) and bool not in wanted and int in wanted
    )
    if not ok:
        names = " or ".join(t.__name__ for t in wanted)
        raise ConfigKeyError(
            f"{section}.{key} must be {names}, got {type(value).__name__} {value!r}; set "
            f"--config.{section}.{key}=<{names}>."
        )
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | Any, section: str) -> T:
    """``cls(**mapping)`` with every key checked against ``cls``'s fields and types."""
    if hasattr(mapping, "to_dict"):
        mapping = mapping.to_dict()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in dict(mapping).items():
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3, cutoff=0.6)
            names = " or ".join(f"{section}.{name}" for name in close)
            hint = f"; did you mean {names}?" if close else ""
            raise ConfigKeyError(f"{section}.{key} is not a config key{hint}")
        wanted, optional = _allowed(hints[key])
        if value is None:
            if not optional:
                raise ConfigKeyError(
                    f"{section}.{key} must be {' or '.join(t.__name__ for t in wanted)}, got None"
                )
            values[key] = None
            continue
        values[key] = _coerce(value, wanted, key, section)
    return cls(**values)


def as_config_dict(cls, exclude: tuple[str, ...] = (), **values) -> ml_collections.ConfigDict:
    """``cls``'s fields (but ``exclude``) with their defaults, replaced by ``values``, as a
    ConfigDict for a config file; a field whose value is None stays typed (an ml_collections
    placeholder), so ``--config.<key>=3`` is checked against the field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigKeyError(f"unknown {cls.__name__} keys {unknown}; known: {sorted(fields)}")
    fields.update(values)
    config = ml_collections.ConfigDict()
    for name, value in fields.items():
        if value is None:
            wanted, _ = _allowed(hints[name])
            value = config_dict.placeholder(wanted[0])
        config[name] = value
    return config
