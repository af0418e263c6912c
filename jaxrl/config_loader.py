"""Typed configs from YAML and the command line: nested frozen dataclasses <-> plain dicts, with type
checks, dotted `key=value` overrides, YAML load and save.

Generic over the dataclass: `jaxrl.config` holds the schema (`RunConfig` and its sections) and builds it
with `load`. A section is a `@section` class whose fields carry their defaults and whose `__post_init__`
validates with `check` / `check_positive`; a failed check names its field relative to the section, and
`from_dict` joins it to the section's dotted key ('precision.loss_scale' + 'hysteresis'), so every error
names the whole key.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml

from jaxrl.errors import ConfigValueError, JaxrlError
from jaxrl.errors import check_field as check
from jaxrl.io import atomic_write, read_yaml

T = TypeVar("T")
_UNION_TYPES = (typing.Union, types.UnionType)

section = dataclasses.dataclass(frozen=True, kw_only=True)  # a config section: frozen, keyword-only fields


def sub(cls: type) -> Any:
    """A field holding section `cls`, defaulting to its defaults."""
    return dataclasses.field(default_factory=cls)


def check_positive(obj: Any, *names: str, minimum: int = 1) -> None:
    """Checks that each field `names` of section `obj` is >= `minimum`."""
    for name in names:
        value = getattr(obj, name)
        check(value >= minimum, name, f"must be >= {minimum}, got {value}")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    # get_type_hints resolves the string annotations that `from __future__ import annotations` leaves.
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in typing.get_type_hints(cls).items() if k in names}


def config_keys(cls: type, path: str = "") -> list[str]:
    """All dotted leaf keys of dataclass `cls`, e.g. ['model.path', ..., 'seed', 'output']."""
    keys = []
    for name, tp in _hints(cls).items():
        is_section = dataclasses.is_dataclass(tp)
        keys += config_keys(tp, _join(path, name)) if is_section else [_join(path, name)]
    return keys


def _unknown_key(cls: type, key: Any, path: str) -> JaxrlError:
    valid = list(_hints(cls))
    message = f"unknown config key '{_join(path, key)}'"
    close = difflib.get_close_matches(str(key), valid, n=1)
    # A key put at the wrong level (`steps: 10` for `train.steps`) is matched by its last component.
    deeper = [k for k in config_keys(cls, path) if k.rsplit(".", 1)[-1] == str(key)]
    if deeper or close:
        guesses = deeper or [_join(path, close[0])]
        message += "; did you mean " + " or ".join(f"'{g}'" for g in guesses) + "?"
    where = f"under '{path}'" if path else "at the top level"
    return JaxrlError(f"{message} Valid keys {where}: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return "a mapping (a config section)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a list [" + ", ".join(_type_name(a) for a in args) + "]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against annotation `tp` and converts it (list -> tuple, int/'1e-4' -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in _UNION_TYPES:
        if value is None and type(None) in args:
            return None
        for arg in args:
            try:
                return _convert(value, arg, key)
            except JaxrlError:
                pass
    elif origin is Literal:
        # `type(...) is` so that True does not pass for 1 (True == 1 in Python).
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) == len(value):
            return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(args, value)))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-4` as a string.
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is Any:
        return value
    elif origin is None and isinstance(tp, type):  # bool, str, ...
        if isinstance(value, tp):
            return value
    elif origin is not tuple:
        raise TypeError(f"config field '{key}' has an unsupported annotation {tp!r}")
    raise JaxrlError(
        f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def from_dict(cls: type[T], d: Any, path: str = "") -> T:
    """Builds dataclass `cls` from a mapping, recursively; keys left out keep their defaults.

    Args:
      cls: a (frozen) dataclass type whose fields may be dataclasses themselves.
      d: a mapping of field name to value, with nested mappings for nested dataclasses.
      path: the dotted key of `d` inside the whole config ("" at the top), for error messages.
    Returns:
      The validated `cls` instance.
    Raises:
      JaxrlError: an unknown key (with a close-match suggestion), a value of the wrong type, or a
        value out of range; the message names the dotted key.
    """
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        where = f"config key '{path}'" if path else "the config"
        raise JaxrlError(f"{where} expects a mapping of keys to values, got {d!r}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise _unknown_key(cls, key, path)
        kwargs[key] = _convert(value, hints[key], _join(path, key))
    try:
        return cls(**kwargs)
    except ConfigValueError as e:  # `field` is relative to this section: give it the section's key
        raise JaxrlError(f"{_join(path, e.field)} {e.message}") from None


def to_dict(cfg: Any) -> Any:
    """`cfg` as plain YAML-ready data: sections become dicts and tuples become lists."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def _accepts(tp: Any, kind: type) -> bool:
    """Whether annotation `tp` admits values of `kind` (str or NoneType) as themselves."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        return any(_accepts(a, kind) for a in args)
    if origin is Literal:
        return all(isinstance(a, kind) for a in args)
    return tp is kind


def _parse_override_value(text: str, tp: Any, key: str) -> Any:
    text = text.strip()
    if not text:
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise JaxrlError(f"override for '{key}': {text!r} is not a YAML value ({e})") from None
    if value is None and _accepts(tp, type(None)):
        return None
    # For text fields keep what was typed: `data.split=10` or `output=2024-01-01` stay strings.
    if not isinstance(value, (str, list, dict)) and _accepts(tp, str):
        return text
    return value


def _merge_overrides(cls: type, d: dict, overrides: Sequence[str]) -> None:
    """Writes each dotted `key=value` of `overrides` into the nested mapping `d` (in place)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise JaxrlError(
                f"malformed override {item!r}: expected KEY=VALUE with a dotted key, e.g. train.steps=10"
            )
        section, node, path = cls, d, ""
        parts = key.split(".")
        for i, part in enumerate(parts):
            hints = _hints(section)
            if part not in hints:
                raise _unknown_key(section, part, path)
            path, tp = _join(path, part), hints[part]
            if i == len(parts) - 1:
                node[part] = _parse_override_value(text, tp, key)
            elif not dataclasses.is_dataclass(tp):
                raise JaxrlError(f"override '{key}': '{path}' is a value, not a section with keys")
            else:
                child = node.get(part)
                if not isinstance(child, dict):
                    child = node[part] = {} if child is None else to_dict(child)
                    if not isinstance(child, dict):
                        raise JaxrlError(f"config key '{path}' expects a mapping, got {child!r}")
                section, node = tp, child


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Returns `cfg` with dotted `key=value` overrides applied, e.g. ["train.steps=10", "mesh.data=-1"].

    Values are parsed as YAML scalars (or flow lists such as `[a.jsonl, b.jsonl]`) and type-checked
    like the YAML file. All overrides are applied before validation, so `optim.grad_accum=3
    train.batch_size=12` works whatever order they come in.
    """
    if not overrides:
        return cfg
    d = to_dict(cfg)
    _merge_overrides(type(cfg), d, overrides)
    return from_dict(type(cfg), d)


def _read_yaml(path: str | os.PathLike) -> dict:
    if not os.path.isfile(path):
        raise JaxrlError(f"config file '{path}' not found")
    data = read_yaml(path, what="config file", fix="repair it or give another --config", expect=None)
    if data is None:  # an empty file (or only comments) changes nothing
        return {}
    if not isinstance(data, dict):
        raise JaxrlError(
            f"config file '{path}' must hold a mapping of config keys (e.g. 'train: {{steps: 10}}'), "
            f"got a {type(data).__name__}"
        )
    return data


def load(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Reads the YAML file at `path` (None: the defaults) into dataclass `cls`, applies `overrides`, validates.

    Raises:
      JaxrlError: a missing or unreadable file, YAML that is not a mapping, or any bad key or value.
    """
    raw = {} if path is None else _read_yaml(path)
    _merge_overrides(cls, raw, overrides)
    try:
        return from_dict(cls, raw)
    except JaxrlError as e:
        if path is None:
            raise
        source = f"{path} and the command-line overrides" if overrides else str(path)
        raise JaxrlError(f"{e} (from {source})") from None


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Writes `cfg` as YAML that `load` reads back equal; atomic (temporary file + rename)."""
    with atomic_write(path) as f:
        f.write("# The resolved config of this run; `--config` this file to run it again.\n")
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, default_flow_style=False)
