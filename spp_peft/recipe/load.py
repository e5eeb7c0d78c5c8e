"""Reading a recipe: a YAML file or string, command-line overrides of dotted keys, then the type and
semantic checks. Also the quickstart recipe, shipped once as package data (``quickstart.yaml``)."""

from __future__ import annotations

import copy
import os
from importlib import resources
from pathlib import Path
from typing import Any, Sequence, Union

from spp_peft.errors import RecipeError, describe_cause, quote
from spp_peft.recipe.checks import validate
from spp_peft.recipe.schema import Recipe
from spp_peft.recipe.values import build_dataclass, got, parse_value, resolve_key
from spp_peft.recipe.yaml12 import parse_yaml

#: The packaged recipe that ``spp-peft demo`` runs (``configs/quickstart.yaml`` links to it).
QUICKSTART_FILE = "quickstart.yaml"


def quickstart_yaml() -> str:
    """The text of the quickstart recipe, read from the installed package."""
    return resources.files(__package__).joinpath(QUICKSTART_FILE).read_text(encoding="utf-8")


def set_key(data: dict, key: str, value: Any) -> None:
    """Set the dotted ``key`` in a nested dict of raw recipe data."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"cannot set {key}: {part} is not a mapping")
        node = child
    node[parts[-1]] = value


def _drop_other_spellings(data: dict, canonical: str) -> None:
    """Remove the keys of ``data`` that name the setting ``canonical`` in another spelling (an alias, or a
    pass-through key outside ``args``), so that an override replaces the recipe's value instead of clashing."""
    parent, _, last = canonical.rpartition(".")
    node = data
    for part in [p for p in parent.split(".") if p]:
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            return
    for key in list(node):
        if key != last and resolve_key(f"{parent}.{key}" if parent else key)[0] == canonical:
            del node[key]
    if parent.endswith(".args") and isinstance(data.get(parent.split(".")[0]), dict):
        data[parent.split(".")[0]].pop(last, None)


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to raw recipe data (a copy is returned)."""
    data = copy.deepcopy(data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise RecipeError(f"override {quote(item)} must look like KEY=VALUE, e.g. train.lr=3e-2")
        canonical, tp = resolve_key(key)
        _drop_other_spellings(data, canonical)
        set_key(data, canonical, parse_value(raw, tp, key))
    return data


def load_recipe_data(source: Union[str, os.PathLike, dict, None]) -> dict:
    """Raw recipe data from a YAML file, a YAML string with a newline, a dict, or ``None`` (defaults)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    text = os.fspath(source)
    if "\n" in text:
        data = parse_yaml(text)
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {quote(text)} does not exist")
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecipeError(f"recipe file {quote(str(path))} is {describe_cause(err)}") from None
        data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping of sections, got {got(data)}")
    return data


def load_recipe(source: Union[str, os.PathLike, dict, None] = None, overrides: Sequence[str] = (),
                check_paths: bool = True) -> Recipe:
    """Read, override, type-check and validate a recipe; every problem raises :class:`RecipeError`.

    Args:
        source: a YAML file, a YAML string, a dict of raw data, or ``None`` for the defaults.
        overrides: ``"KEY=VALUE"`` strings with dotted keys (``"train.lr=3e-2"``).
        check_paths: also check what the machine must provide: the model, data and evaluation files exist,
            hub ids are not requested while offline, lm-eval is installed when zero-shot tasks are asked for.
    """
    data = apply_overrides(load_recipe_data(source), overrides)
    recipe = build_dataclass(Recipe, data)
    validate(recipe, check_paths=check_paths)
    return recipe
