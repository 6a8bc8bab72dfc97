"""Typed dataclasses from manifest JSON: exact fields, strict types, sane ranges, one-line errors.

A manifest's config was written by `dataclasses.asdict`; reading it back must refuse what
that never writes (an extra or missing field, a string for a number, NaN, a zero size)
instead of failing later inside a graph.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields, is_dataclass
from typing import Any, TypeVar, Union

from saisa_edge.config import UPPER_BOUNDS, SaisaConfig, check_text, check_vision
from saisa_edge.errors import SaisaError

T = TypeVar("T")
# fields that may be zero or negative (all other numbers must be positive)
_SIGNED = {"select_layer", "projector_depth", "eos_token_ids", "image_mean", "compute_capability"}


def _value(hint: Any, value: Any, name: str, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value, name, where)
    if is_dataclass(hint):
        return build(hint, value, f"{where}.{name}")  # type: ignore[arg-type]
    if origin is dict:
        if not isinstance(value, dict):
            raise SaisaError(f"{where}.{name}: {value!r} is not an object")
        return {k: v if args[1] is Any else _value(args[1], v, f"{name}[{k!r}]", where) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise SaisaError(f"{where}.{name}: {value!r} is not a list")
        return [_value(args[0], v, name, where) for v in value]
    if origin is tuple:
        if not isinstance(value, list) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise SaisaError(f"{where}.{name}: {value!r} is not a list of {len(args)} values")
        return tuple(_value(args[0], v, name, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise SaisaError(f"{where}.{name}: {value!r} is not true or false")
        return value
    if hint is int:
        if type(value) is not int or (value <= 0 and name not in _SIGNED) or (name == "projector_depth" and value < 0):
            raise SaisaError(f"{where}.{name}: {value!r} is not a {'' if name in _SIGNED else 'positive '}integer")
        if abs(value) > UPPER_BOUNDS.get(name, abs(value)):
            raise SaisaError(f"{where}.{name}: {value} is over the bound of {UPPER_BOUNDS[name]}")
        return value
    if hint is float:
        if type(value) not in (int, float) or not math.isfinite(value) or (value <= 0 and name not in _SIGNED):
            raise SaisaError(f"{where}.{name}: {value!r} is not a {'' if name in _SIGNED else 'positive '}finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise SaisaError(f"{where}.{name}: {value!r} is not a string")
        return value
    raise TypeError(f"no JSON reading for {hint}")  # a new field type in the config: teach `_value`


def build(cls: type[T], raw: Any, where: str) -> T:
    """`cls` from a JSON object with exactly its fields, each of its annotated type."""
    if not isinstance(raw, dict):
        raise SaisaError(f"{where}: a JSON {type(raw).__name__}, not an object of {cls.__name__} fields")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    missing, extra = [n for n in names if n not in raw], sorted(set(raw) - set(names))
    if missing or extra:
        raise SaisaError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown field {', '.join(extra)}"] if extra else []))
            + f" (the {cls.__name__} of this saisa-edge)")
    return cls(**{n: _value(hints[n], raw[n], n, where) for n in names})


def config_from_json(raw: Any, where: str = "config") -> SaisaConfig:
    """The model config a manifest carries, checked field by field against the bounds config.json
    is read with (`config.UPPER_BOUNDS`); then the relations between its sizes, by the same checks."""
    cfg = build(SaisaConfig, raw, where)
    check_text(cfg.text, f"{where}.text")
    check_vision(cfg.vision, f"{where}.vision")
    cfg.vision_layers_used()  # select_layer inside the tower
    return cfg

