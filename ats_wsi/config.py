"""YAML configs validated against a schema, and the checks pipelines add on top.

A schema maps each key to ``(types, default)`` (``types`` a tuple of Python types, ``default``
a value or :data:`REQUIRED`) or to a nested schema. Every error is a :class:`ConfigError`
naming the file (or run folder) and the dotted key.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "REQUIRED",
    "ConfigError",
    "check_choices",
    "check_resume_config",
    "load_yaml_config",
    "read_yaml",
    "validate",
]


class ConfigError(ValueError):
    """A config file has an unknown key, a missing key or a value of the wrong type."""


REQUIRED = object()
"""Default marker in a schema: the key must be present."""


def _check(schema: Mapping[str, Any], data: Any, where: str, src: str) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{src}: {where or 'top level'} must be a mapping, got {type(data).__name__}"
        )
    out: dict[str, Any] = {}
    for key in data:
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"{src}: unknown key '{where}{key}' (known here: {known})")
    for key, spec in schema.items():
        path = f"{where}{key}"
        if isinstance(spec, Mapping):
            out[key] = _check(spec, data.get(key, {}), f"{path}.", src)
            continue
        types, default = spec
        if key not in data:
            if default is REQUIRED:
                raise ConfigError(f"{src}: missing required key '{path}'")
            out[key] = default
            continue
        value = data[key]
        # bool is an int subclass: never accept it where a number is expected, and accept an
        # int where a float is expected (YAML writes 1 for 1.0).
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ConfigError(
                f"{src}: key '{path}' must be {names}, got {type(value).__name__} {value!r}"
            )
        out[key] = value
    return out


def validate(data: Any, schema: Mapping[str, Any], src: str = "<dict>") -> dict[str, Any]:
    """Check ``data`` against ``schema`` (errors name ``src``); return it with defaults."""
    return _check(schema, data if data is not None else {}, "", src)


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of ``path``; invalid YAML is a :class:`ConfigError` naming the file."""
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc


def load_yaml_config(path: str | Path, schema: Mapping[str, Any]) -> dict[str, Any]:
    """Read ``path`` with ``yaml.safe_load`` and validate it against ``schema``.

    Unknown keys, missing required keys and wrongly typed values raise :class:`ConfigError`.
    Returns plain data with defaults filled in.
    """
    return validate(read_yaml(path), schema, str(path))


def check_choices(
    cfg: Mapping[str, Any], where: str, choices: Mapping[tuple[str, ...], tuple[Any, ...]]
) -> None:
    """Values limited to a set of names (registry entries, modes) name the key when wrong."""
    for path, allowed in choices.items():
        value: Any = cfg
        for k in path:
            value = value[k]
        if value not in allowed:
            raise ConfigError(
                f"{where}: key '{'.'.join(path)}' must be one of {list(allowed)}, got {value!r}"
            )


def check_resume_config(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    where: str,
    *,
    resumable: Collection[tuple[str, ...]] = (),
) -> None:
    """Refuse to resume a run whose configuration changed.

    ``resumable`` lists the key paths (whole sections included) that may differ between a
    run and its resume; any other difference raises :class:`ConfigError`. Keys are compared
    in a fixed order (``old``'s, then the keys only ``new`` has, in ``new``'s order), so the
    difference reported first does not depend on the hash seed.
    """

    def walk(a: Any, b: Any, path: tuple[str, ...]) -> None:
        if path in resumable:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in [*a, *(k for k in b if k not in a)]:
                walk(a.get(k), b.get(k), (*path, k))
        elif a != b:
            raise ConfigError(
                f"{where}: cannot resume, '{'.'.join(path)}' was {a!r} and is now {b!r}"
            )

    walk(old, new, ())
