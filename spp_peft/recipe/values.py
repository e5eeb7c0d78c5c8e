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


def unknown_key(key: str, known: Sequence[str], where: str, candidates: Sequence[str] = ()) -> RecipeError:
    close = difflib.get_close_matches(key, [*known, *candidates], n=1)
    hint = f"; did you mean {quote(close[0])}?" if close else ""
    listed = f" (known: {', '.join(known)})" if known else ""
    return RecipeError(f"unknown key {where + '.' if where else ''}{quote(key)[1:-1]}{hint}{listed}")


def _canonical_keys(cls, data: dict, where: str) -> dict:
    """``data`` with the aliases of ``cls`` (``cls.ALIASES``: ``{alias: field}``) renamed to their fields, and
    keys that are neither moved into ``cls.EXTRA_KEYS`` when the class takes them (``train:`` passes
    TrainingArguments fields through to ``train.args``); anything else is an unknown key."""
    aliases = getattr(cls, "ALIASES", {})
    extra_field = getattr(cls, "EXTRA_KEYS", None)
    known = [f.name for f in dataclasses.fields(cls)]
    out: dict = {}
    extras: dict = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name in out:
            first = next(k for k in data if aliases.get(k, k) == name and k != key)
            raise RecipeError(f"{where}.{key} and {where}.{first} name the same setting; give one")
        if name in known:
            out[name] = value
            continue
        candidates = [*aliases, *_extra_names(extra_field)]
        if extra_field is None or str(key) not in candidates:
            raise unknown_key(str(key), [*aliases, *known], where, candidates)
        extras[key] = value
    if extras:
        given = out.get(extra_field) or {}
        clash = next((k for k in extras if isinstance(given, dict) and k in given), None)
        if clash is not None:
            raise RecipeError(f"{where}.{clash} and {where}.{extra_field}.{clash} name the same setting; give one")
        out[extra_field] = {**extras, **given} if isinstance(given, dict) else given
    return out


def _extra_names(extra_field) -> list[str]:
    """The names a class with pass-through keys takes (TrainingArguments' fields; imports transformers)."""
    if extra_field is None:
        return []
    from spp_peft.training.arguments import hf_fields

    return list(hf_fields())


def build_dataclass(cls, data: Any, where: str = ""):
    """An instance of ``cls`` from a mapping, with unknown keys and wrong types rejected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {got(data)}")
    types_ = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in _canonical_keys(cls, data, where).items():
        kwargs[key] = coerce(value, types_[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a dataclass checking itself in __post_init__
        raise section_error(where or "recipe", err) from None


def section_error(section: str, err: Exception) -> RecipeError:
    """``err`` (a section's own refusal) as a RecipeError that names the section once."""
    message = str(err)
    return RecipeError(message if message.startswith(section) else f"{section}: {message}")


def resolve_key(key: str) -> tuple[str, Any]:
    """``(canonical dotted key, type)`` of the recipe key ``key``: aliases become their fields
    (``train.learning_rate`` -> ``train.lr``), pass-through names go under ``train.args``; RecipeError if unknown."""
    cls, tp, path = Recipe, None, []
    for part in key.split("."):
        if cls is not None:
            part = getattr(cls, "ALIASES", {}).get(part, part)
            known = [f.name for f in dataclasses.fields(cls)]
            extra_field = getattr(cls, "EXTRA_KEYS", None)
            if part not in known:
                extras = _extra_names(extra_field)
                if part not in extras:
                    raise unknown_key(part, known, ".".join(path), [*getattr(cls, "ALIASES", {}), *extras])
                from spp_peft.training.arguments import hf_fields

                path.append(extra_field)
                cls, tp = None, hf_fields()[part]
            else:
                tp = typing.get_type_hints(cls)[part]
                cls = tp if dataclasses.is_dataclass(tp) else None
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise RecipeError(f"unknown key {key}: {'.'.join(path)} has no sub-keys")
        path.append(part)
    return ".".join(path), tp


def field_type(key: str):
    """The type of the dotted recipe key ``key`` (``train.lr``, ``train.method_lr.spp``); RecipeError if unknown."""
    return resolve_key(key)[1]


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
            primary = {v: k for k, v in getattr(tp, "ALIASES", {}).items()}
            for sf in dataclasses.fields(tp):
                help_text = sf.metadata.get("help", "")
                if sf.name in primary:
                    help_text = f"{help_text} (alias: {f.name}.{sf.name})"
                rows.append((f"{f.name}.{primary.get(sf.name, sf.name)}", type_name(section_types[sf.name]),
                             getattr(section, sf.name), help_text))
        else:
            rows.append((f.name, type_name(tp), getattr(defaults, f.name), f.metadata.get("help", "")))
    return rows
