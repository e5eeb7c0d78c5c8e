"""Values checked against the schema's types: raw YAML data into section dataclasses, command-line strings
into typed values, and the list of every key for ``spp-peft keys``.

Strict on purpose, so a bad recipe fails before any work: unknown keys (with a "did you mean"), wrong types
and invalid values raise :class:`~spp_peft.errors.RecipeError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Sequence, Union

from spp_peft.errors import RecipeError, quote
from spp_peft.recipe.schema import Recipe
from spp_peft.recipe.yaml12 import parse_yaml


def type_name(tp) -> str:
    """A type as the messages and ``--help`` spell it (``list of str``, ``int or null``)."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {type_name(k)} to {type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def got(value) -> str:
    """The value of a message's "got ...": quoted (bounded) with its type."""
    return f"{quote(value)} ({type(value).__name__})"


def _coerce_union(value: Any, tp: Any, key: str) -> Any:
    for option in typing.get_args(tp):
        try:
            return coerce(value, option, key)
        except RecipeError:
            pass
    raise RecipeError(f"{key}: expected {type_name(tp)}, got {got(value)}")


def _coerce_container(value: Any, tp: Any, key: str) -> Any:
    kind = list if typing.get_origin(tp) is list else dict
    if not isinstance(value, kind):
        raise RecipeError(f"{key}: expected {type_name(tp)}, got {got(value)}")
    if kind is list:
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    kt, vt = typing.get_args(tp)
    return {coerce(k, kt, f"{key} key"): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type ``tp`` (ints are accepted for floats); raises :class:`RecipeError`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, key)
    if origin in (list, dict):
        return _coerce_container(value, tp, key)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        raise RecipeError(f"{key}: expected a string, got {got(value)}; quote the value in YAML")
    elif dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    else:
        raise RecipeError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug
    raise RecipeError(f"{key}: expected {type_name(tp)}, got {got(value)}")


def unknown_key(key: str, known: Sequence[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {quote(close[0])}?" if close else ""
    return RecipeError(f"unknown key {where + '.' if where else ''}{quote(key)[1:-1]}{hint} (known: {', '.join(known)})")


def build_dataclass(cls, data: Any, where: str = ""):
    """An instance of ``cls`` from a mapping, with unknown keys and wrong types rejected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {got(data)}")
    types_ = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise unknown_key(str(key), known, where)
        kwargs[key] = coerce(value, types_[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a dataclass checking itself in __post_init__
        raise section_error(where or "recipe", err) from None


def section_error(section: str, err: Exception) -> RecipeError:
    """``err`` (a section's own refusal) as a RecipeError that names the section once."""
    message = str(err)
    return RecipeError(message if message.startswith(section) else f"{section}: {message}")


def field_type(key: str):
    """The type of the dotted recipe key ``key`` (``train.lr``, ``train.method_lr.spp``); RecipeError if unknown."""
    cls, tp, path = Recipe, None, []
    for part in key.split("."):
        if cls is not None:
            known = [f.name for f in dataclasses.fields(cls)]
            if part not in known:
                raise unknown_key(part, known, ".".join(path))
            tp = typing.get_type_hints(cls)[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise RecipeError(f"unknown key {key}: {'.'.join(path)} has no sub-keys")
        path.append(part)
    return tp


def parse_value(raw: str, tp: Any, key: str) -> Any:
    """A command-line string as a value of type ``tp``: strings stay verbatim, lists may be comma-separated."""
    def is_str(t):
        return t is str or (typing.get_origin(t) in (Union, types.UnionType) and str in typing.get_args(t)
                            and raw not in ("null", "~", "None"))

    if is_str(tp):
        return raw
    origin = typing.get_origin(tp)
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if origin in (Union, types.UnionType) else [tp]
    if len(inner) == 1 and typing.get_origin(inner[0]) is list and not raw.strip().startswith("["):
        item = typing.get_args(inner[0])[0]
        if raw.strip() == "":
            return []
        return [raw_item if item is str else parse_yaml(raw_item, key) for raw_item in
                (p.strip() for p in raw.split(","))]
    if raw in ("None",):
        return None
    return parse_yaml(raw, key)


def recipe_keys() -> list[tuple[str, str, Any, str]]:
    """Every recipe key: ``(dotted key, type name, default, help)``, for documentation and ``--help``."""
    rows = []
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        tp = typing.get_type_hints(Recipe)[f.name]
        if dataclasses.is_dataclass(tp):
            section = getattr(defaults, f.name)
            section_types = typing.get_type_hints(tp)
            for sf in dataclasses.fields(tp):
                rows.append((f"{f.name}.{sf.name}", type_name(section_types[sf.name]), getattr(section, sf.name),
                             sf.metadata.get("help", "")))
        else:
            rows.append((f.name, type_name(tp), getattr(defaults, f.name), f.metadata.get("help", "")))
    return rows
