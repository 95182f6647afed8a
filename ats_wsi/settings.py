"""Typed settings: a dataclass is the schema of its config section.

A settings class is a plain ``@dataclass`` whose fields carry type hints and defaults (a field
without a default is required). :func:`parse` validates plain data (a YAML mapping, a
checkpoint's stored config) once, with :func:`ats_wsi.config.validate`'s rules and one-line
errors (unknown keys and wrong types named with their dotted path and the file), and builds
the objects, nested dataclasses included. :func:`to_dict` gives the plain data back (what
checkpoints store and resume compares). Settings hold data only: names select registry
entries, never code.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ats_wsi.config import REQUIRED, read_yaml, validate

__all__ = ["load_yaml", "parse", "schema_of", "to_dict"]

T = TypeVar("T")


def _types_of(hint: Any) -> tuple[type, ...]:
    """The runtime types a YAML value may have for a field annotated ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        out: tuple[type, ...] = ()
        for arg in typing.get_args(hint):
            out += tuple(t for t in _types_of(arg) if t not in out)
        return out
    if hint is None or hint is type(None):
        return (type(None),)
    if hint is Any:
        return (object,)
    if hint is float:
        # An int stays an int (YAML writes 16 for 16.0; the value is kept as written).
        return (int, float)
    base = origin or hint
    if isinstance(base, type) and issubclass(base, Mapping):
        return (dict,)
    if base in (list, tuple):
        return (list,)
    if isinstance(base, type):
        return (base,)
    raise TypeError(f"unsupported settings annotation {hint!r}")


@functools.cache
def schema_of(cls: type) -> dict[str, Any]:
    """The :func:`ats_wsi.config.validate` schema of a settings dataclass (nested ones too)."""
    hints = typing.get_type_hints(cls)
    schema: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            schema[f.name] = schema_of(hint)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        schema[f.name] = (_types_of(hint), default)
    return schema


def _build(cls: type[T], data: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        kwargs[f.name] = _build(hints[f.name], value) if dataclasses.is_dataclass(
            hints[f.name]
        ) else value
    return cls(**kwargs)


def parse(cls: type[T], data: Any, src: str = "<dict>") -> T:
    """Validate plain ``data`` against ``cls`` (errors name ``src`` and the dotted key) and
    build it; missing keys get their defaults (a nested section's from its own fields).
    ``None`` is an empty mapping."""
    # A copy: the cached schema's mutable defaults must not be shared between configs.
    return _build(cls, copy.deepcopy(validate(data, schema_of(cls), src)))


def load_yaml(cls: type[T], path: str | os.PathLike[str]) -> T:
    """A settings object from a YAML file (``yaml.safe_load``; errors name the file)."""
    return parse(cls, read_yaml(path), str(path))


def to_dict(settings: Any) -> dict[str, Any]:
    """Plain nested data of a settings object (``dataclasses.asdict``)."""
    return dataclasses.asdict(settings)
