"""Recipes: the YAML files that describe a whole run (prune -> fine-tune -> merge -> verify -> eval -> export).

A recipe has one section per stage; each section is a dataclass whose fields are the section's keys, so
the schema, the defaults, the command-line flags and the documentation come from one place:

========== ==================================================================================
section    dataclass
========== ==================================================================================
model      :class:`ModelSection` (what to load)
pruning    :class:`PruningSection`: the fields of :class:`spp_peft.pruning.PruningConfig` plus the
           calibration data (``calibration``, ``nsamples``, ``seqlen``); ``method: none`` skips pruning
data       :class:`spp_peft.training.DataConfig` (training data)
train      :class:`TrainSection`: :class:`spp_peft.training.TrainConfig` plus ``methods`` and ``method_lr``
eval       :class:`EvalSection`
export     :class:`ExportSection`
report     :class:`ReportSection`
========== ==================================================================================

Loading is strict, so a bad recipe fails before any work: unknown keys (with a "did you mean"), wrong
types, missing files and invalid values all raise :class:`RecipeError` naming the key. The ``train:`` keys
go by ``TrainingArguments``' names (``learning_rate``; the short ``lr`` stays an alias, see
``TrainConfig.ALIASES``), and any other ``TrainingArguments`` field passes through (``train.args``, or
directly under ``train:``), checked against transformers before any work. Every key can be overridden
from the command line (``--set train.learning_rate=3e-2`` or ``--train.learning_rate 3e-2``); override
values are read with the key's type, so ``--set pruning.pattern=2:4`` stays the string ``"2:4"``.

The modules: ``schema`` (the section dataclasses), ``yaml12`` (YAML 1.2 scalars), ``values`` (types and
overrides), ``checks`` (semantic checks, shared with the CLI's flags), ``load`` (:func:`load_recipe`, the
packaged quickstart recipe).
"""

from spp_peft.errors import RecipeError
from spp_peft.recipe.checks import (
    TASK_PRESETS,
    check_eval,
    check_model,
    check_pruning,
    check_source,
    expand_tasks,
    validate,
)
from spp_peft.recipe.load import (
    QUICKSTART_FILE,
    apply_overrides,
    load_recipe,
    load_recipe_data,
    quickstart_yaml,
    set_key,
)
from spp_peft.recipe.schema import (
    EvalSection,
    ExportSection,
    ModelSection,
    PruningSection,
    Recipe,
    ReportSection,
    TrainSection,
    section_classes,
)
from spp_peft.recipe.values import (
    build_dataclass,
    coerce,
    field_type,
    parse_value,
    recipe_keys,
    resolve_key,
    type_name,
)
from spp_peft.recipe.yaml12 import parse_yaml

__all__ = [
    "EvalSection", "ExportSection", "ModelSection", "PruningSection", "QUICKSTART_FILE", "Recipe", "RecipeError",
    "ReportSection", "TASK_PRESETS", "TrainSection", "apply_overrides", "build_dataclass", "check_eval",
    "check_model", "check_pruning", "check_source", "coerce", "expand_tasks", "field_type",
    "load_recipe", "load_recipe_data", "parse_value", "parse_yaml", "quickstart_yaml", "recipe_keys", "resolve_key",
    "section_classes", "set_key", "type_name", "validate",
]

