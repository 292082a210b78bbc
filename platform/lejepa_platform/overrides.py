"""Configs from outside values: stored nested dicts (`from_dict`), command-line text
(`apply_overrides`, the `--set section.field=value` flags) and Python values by dotted key
(`set_values`, one sweep trial). Every value is checked against the field's annotation and the
result is a new frozen config; errors are `ConfigError`s naming the key and what it allows.

Hand-written on purpose: the configs are frozen dataclasses with tuple and free-form dict fields
and one-line errors; OmegaConf-style libraries return their own container types, store tuples as
lists and word their errors for themselves, so adapting to one would be longer than this module.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from lejepa_platform.errors import ConfigError

C = TypeVar("C")


def from_dict(cls: type[C], data: Mapping[str, Any], *, prefix: str = "") -> C:
    """Build `cls` from a nested mapping, checking every key and type."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; allowed: {', '.join(sorted(names))}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def apply_overrides(cfg: C, overrides: Iterable[str]) -> C:
    """Return a new config with each `dotted.key=value` (command-line text) applied in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        cfg = _override(cfg, key.strip().split("."), raw, key.strip(), from_text=True)
    return cfg


def set_values(cfg: C, values: Mapping[str, Any]) -> C:
    """Return a new config with Python values set by dotted key (sweeps use this per trial)."""
    for key, value in values.items():
        cfg = _override(cfg, key.split("."), value, key, from_text=False)
    return cfg


def check_key(cls: type, key: str) -> None:
    """Raise ConfigError unless `key` names a field (or a backbone_kwargs entry) of `cls`."""
    _override(cls(), key.split("."), None, key, from_text=False, dry_run=True)


def _override(cfg: Any, parts: list[str], raw: Any, path: str, *, from_text: bool, dry_run: bool = False) -> Any:
    names = {f.name: f for f in dataclasses.fields(cfg)}
    head = parts[0]
    if head not in names:
        where = path[: len(path) - len(".".join(parts))].rstrip(".") or "config"
        raise ConfigError(f"unknown config key {path!r}; {where} has: {', '.join(sorted(names))}")
    current = getattr(cfg, head)
    hint = typing.get_type_hints(type(cfg))[head]
    if dataclasses.is_dataclass(current):
        if len(parts) == 1:
            raise ConfigError(f"{path!r} is a section; set one of its fields, e.g. {path}.{next(iter(names))}")
        sub = _override(current, parts[1:], raw, path, from_text=from_text, dry_run=dry_run)
        return cfg if dry_run else dataclasses.replace(cfg, **{head: sub})
    if isinstance(current, dict) and len(parts) > 1:
        if dry_run:
            return cfg
        new = dict(current)
        new[".".join(parts[1:])] = _parse_scalar(raw) if from_text else raw
        return dataclasses.replace(cfg, **{head: new})
    if len(parts) > 1:
        raise ConfigError(f"unknown config key {path!r}: {'.'.join(path.split('.')[:-len(parts) + 1])} is not a section")
    if dry_run:
        return cfg
    value = _parse_text(raw, hint) if from_text else raw
    return dataclasses.replace(cfg, **{head: _coerce(value, hint, path)})


def _parse_scalar(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _parse_text(raw: str, hint: Any) -> Any:
    """Turn command-line text into a Python value guided by the field's type."""
    origin = typing.get_origin(hint)
    if hint is str or origin is typing.Literal:
        return raw
    if hint is bool:
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        return raw
    if origin is tuple:
        text = raw.strip()
        if text.startswith("["):
            return _parse_scalar(text)
        return [_parse_scalar(part.strip()) for part in text.split(",") if part.strip()]
    return _parse_scalar(raw)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    """Check `value` against the annotation and convert lossless cases (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_dict(hint, value, prefix=f"{path}.")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{path} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if hint is str or origin is typing.Literal:  # which strings a Literal allows: config._check_choices
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path} must be a string, got {value!r}")
    if hint is dict or origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise ConfigError(f"{path} must be a mapping, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], path) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{path} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, path) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} has the wrong type: {value!r}")
    return value
