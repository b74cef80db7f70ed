"""Typed stage configs: dataclasses loaded from JSON/YAML plus ``--set key=value`` overrides."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and how to fix it."""


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or value is None:
        return value
    if origin is typing.Union or (origin is not None and str(origin) == "types.UnionType"):
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], field) if len(non_none) == 1 else value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value) if isinstance(value, dict) else value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, field) for v in value]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        return json.loads(value) if isinstance(value, str) else dict(value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{field}: expected a boolean, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{field}: expected {tp.__name__}, got {value!r}") from e
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build ``cls`` from a dict; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{cls.__name__}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def load_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """``--config`` (a JSON/YAML file or an inline JSON object) then ``--set a.b=value`` overrides."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", help="JSON/YAML file or inline JSON object")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field (dotted keys for nested configs); repeatable")
    ns = parser.parse_args(argv)
    data: dict[str, Any] = {}
    if ns.config:
        text = ns.config
        if not text.lstrip().startswith("{"):
            text = Path(ns.config).read_text()
        if ns.config.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    for item in ns.set:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        _set_dotted(data, key, parsed)
    return from_dict(cls, data)
