"""Configs are dataclasses; YAML files and `key=value` overrides fill them, checked field by field."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from kosmo.errors import KosmoError


def parse_overrides(pairs: list[str]) -> dict:
    """["train.lr=1e-3", "model.size=tiny"] -> {"train": {"lr": "1e-3"}, "model": {"size": "tiny"}}."""
    out: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise KosmoError(f"override {pair!r} is not of the form key=value")
        key, value = pair.split("=", 1)
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise KosmoError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise KosmoError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise KosmoError(f"{path}: a config file must hold a mapping of keys")
    return data


def build(cls, data: dict, where: str = ""):
    """An instance of dataclass `cls` from a nested dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in fields:
            raise KosmoError(f"unknown config key '{path}' (known: {', '.join(sorted(fields))})")
        default = fields[key].default_factory
        if hints[key] is dict and isinstance(value, dict) and default is not dataclasses.MISSING:
            value = merge(default(), value)  # `vision.dim=64` changes one entry, not the whole mapping
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise KosmoError(f"invalid config{' ' + where.rstrip('.') if where else ''}: {e}") from None


def _coerce(value, tp, path):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise KosmoError(f"config key '{path}' must be a mapping")
        return build(tp, value, path + ".")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path) if len(args) == 1 else value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise KosmoError(f"config key '{path}' must be a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (typing.Any,)
        items = [_coerce(v, inner, path) for v in value] if inner is not typing.Any else list(value)
        return origin(items)
    if tp is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            pass
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise KosmoError(f"config key '{path}' must be {tp.__name__}, got {value!r}")
    return value


def load(cls, path: str | Path | None = None, overrides: list[str] = (), defaults: dict | None = None):
    data = merge(defaults or {}, read_yaml(path) if path else {})
    return build(cls, merge(data, parse_overrides(list(overrides))))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


class ModelConfig:
    """What every model config (a dataclass) shares: a plain dict out, for a run's `config.json`, and
    back in through `build`, so that an unknown or mistyped key is an error rather than dropped."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = ""):
        return build(cls, data, where)
