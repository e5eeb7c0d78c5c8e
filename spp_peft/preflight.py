"""Checks that need more than the recipe's text but less than the real work: the model's skeleton (built
from its config on the ``meta`` device: no weights, no memory) and the content of local data files.

They run before anything is pruned, trained or written, so that a target that does not exist, an ``r``
larger than a projection, or an empty or undecodable data file is reported in seconds, not after pruning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import nn

from spp_peft.errors import RecipeError, describe_cause, quote, reading


def _fail(message: str):
    raise RecipeError(message)


# ------------------------------------------------------------------------------------------ the model


def model_skeleton(name_or_path: str) -> nn.Module:
    """The model named by ``name_or_path`` built from its config on the ``meta`` device (module names and
    weight shapes only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from spp_peft.estimate import load_config

    with reading(name_or_path, "the model config of"):
        config, _ = load_config(name_or_path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_adapter_targets(model: nn.Module, targets: Sequence[str], key: str, r: Optional[int] = None) -> None:
    """Every target name matches at least one module (PEFT's suffix rule), every match is a linear layer,
    and ``r`` (SPP's row groups) is at most the output features of every match."""
    from spp_peft._utils.targets import matches_target
    from spp_peft.sparsity import in_out_features, is_linear_like, linear_weights

    modules = dict(model.named_modules())
    shapes = linear_weights(model)
    for target in targets:
        matched = [name for name in modules if name and matches_target(name, [target])]
        if not matched:
            _fail(f"{key}: {quote(target)} matches no module of the model; linear layers are e.g. "
                  f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in shapes})[:8])}")
        for name in matched:
            if not is_linear_like(modules[name]):
                _fail(f"{key}: {quote(target)} matches {name} ({type(modules[name]).__name__}), "
                      "not a linear layer")
            out_features = in_out_features(modules[name])[1]
            if r is not None and r > out_features:
                _fail(f"train.r={r} is larger than the {out_features} output features of {name} "
                      "(SPP needs 1 <= r <= out_features); lower train.r or leave that module out")


def check_pruning_targets(model: nn.Module, targets: Union[None, str, Sequence[str]], key: str) -> None:
    """The pruning targets select at least one linear layer, and each listed name matches one."""
    from spp_peft.models import find_linears

    if targets is None:
        return
    for target in [targets] if isinstance(targets, str) else targets:
        if not find_linears(model, target if isinstance(targets, str) else [target]):
            _fail(f"{key}: {quote(target)} matches no linear layer of the model")


def check_recipe_model(recipe) -> None:
    """The recipe's targets and ``r`` against the model's skeleton (before loading or pruning anything)."""
    trained = [m for m in recipe.train.methods if m != "none"]
    if not trained and recipe.pruning.method == "none":
        return
    model = model_skeleton(recipe.model.name_or_path)
    if recipe.pruning.method != "none":
        check_pruning_targets(model, recipe.pruning.target_modules, "pruning.target_modules")
    if trained:
        r = recipe.train.r if "spp" in trained else None
        check_adapter_targets(model, recipe.train.target_modules, "train.target_modules", r)


# ------------------------------------------------------------------------------------------ data files


def check_data_file(path: Path, key: str) -> None:
    """A local data file is UTF-8, holds more than whitespace and, for ``.json`` / ``.jsonl``, parses.

    Read line by line (``.json``: whole), so a large file costs one pass and no more memory than a line.
    """
    if path.suffix.lower() == ".json":
        return _check_json(path, key)
    blank, jsonl = True, path.suffix.lower() == ".jsonl"
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                _fail(f"{key}: file {quote(str(path))} line {number} is {describe_cause(err)}")
            if not line.strip():
                continue
            blank = False
            if jsonl:
                _parse_json(line, path, key, f"line {number}")
    if blank:
        _fail(f"{key}: file {quote(str(path))} is empty")


def _check_json(path: Path, key: str) -> None:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        _fail(f"{key}: file {quote(str(path))} is {describe_cause(err)}")
    if not text.strip():
        _fail(f"{key}: file {quote(str(path))} is empty")
    try:
        json.loads(text)
    except json.JSONDecodeError:
        # datasets also reads JSON Lines from a .json file: then every line must parse.
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                _parse_json(line, path, key, f"line {number}")


def _parse_json(text: str, path: Path, key: str, where: str) -> None:
    try:
        json.loads(text)
    except json.JSONDecodeError as err:
        _fail(f"{key}: file {quote(str(path))} {where} is not valid JSON ({err.msg}, column {err.colno})")
