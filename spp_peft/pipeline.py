"""The whole job from a recipe: load -> prune -> fine-tune each method -> merge -> verify -> evaluate ->
export -> report.

Each stage is a small function over the library (:mod:`spp_peft.models`, :mod:`spp_peft.pruning`,
:mod:`spp_peft.training`, :mod:`spp_peft.sparsity`, :mod:`spp_peft.evaluation`, :mod:`spp_peft.report`);
nothing here computes anything of its own. :func:`run` chains them and returns the results dict that
``report.json`` holds. The CLI (:mod:`spp_peft.cli`) calls the same stage functions.

Layout of a run folder::

    recipe.yaml            the resolved recipe (defaults and overrides filled in)
    run.log                the log
    pruned/                the pruned base (safetensors, pruning metadata in config.json)
    <method>/adapter/      the trained adapter, model card, spp_peft_training.json
    <method>/checkpoints/  Trainer checkpoints (train.save_steps > 0); a rerun resumes from them
    <method>/train_log.json
    merged/<method>/       the exported merged model (export.methods), verified before it appears
    report.md, report.json, plots/*.png
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from spp_peft._utils.tensors import load_safetensors_folder, numel, parse_dtype
from spp_peft.recipe import Recipe, RecipeError, expand_tasks, load_recipe
from spp_peft.sparsity import (
    SparsityViolation,
    assert_same_sparsity,
    describe_mask,
    linear_weights,
    sparsity_report,
)

logger = logging.getLogger("spp_peft.pipeline")

#: Key of the sparsity metadata written into an exported model's ``config.json``.
SPARSITY_CONFIG_KEY = "spp_sparsity"


# ------------------------------------------------------------------------------------------ stages


def load(model_section) -> tuple[nn.Module, Any]:
    """Load the model and tokenizer named by the recipe's ``model:`` section."""
    from spp_peft.errors import reading
    from spp_peft.models import load_model

    with reading(model_section.name_or_path, "model.name_or_path"):  # a truncated file names itself
        return load_model(model_section.name_or_path, dtype=parse_dtype(model_section.dtype))


def pruning_config(section, calibration_source: Optional[str] = None):
    """The :class:`spp_peft.pruning.PruningConfig` of a recipe's ``pruning:`` section."""
    from spp_peft.pruning import PruningConfig

    names = {f.name for f in dataclasses.fields(PruningConfig)}
    values = {k: v for k, v in vars(section).items() if k in names}
    values["calibration_source"] = calibration_source or section.calibration
    if values.get("seed") is None:
        values["seed"] = 0
    return PruningConfig(**values)


def prune_model(model: nn.Module, tokenizer, section, show_progress: bool = True):
    """Prune ``model`` in place as the ``pruning:`` section says; returns the ``PruningResult`` (None for 'none')."""
    if section.method == "none":
        return None
    from spp_peft.data import calibration_windows, load_texts
    from spp_peft.pruning import attach_metadata, prune_with_config

    config = pruning_config(section)
    calibration = None
    if config.needs_calibration:
        calibration = calibration_windows(tokenizer, load_texts(section.calibration), section.nsamples,
                                          section.seqlen, seed=config.seed)
    result = prune_with_config(model, config, calibration, show_progress=show_progress)
    attach_metadata(model, result)
    return result


def pruned_layers(model: nn.Module) -> list[str]:
    """Names of the pruned linear layers: from the pruning metadata, else every linear layer holding zeros
    except the output head (whose zeros, if any, are a padding row of tied embeddings, not pruning)."""
    meta = getattr(model.config, "spp_pruning", None) or {}
    if meta.get("pruned_layers"):
        return list(meta["pruned_layers"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name for name, module in model.named_modules() if head is not None and module is head}
    return [layer.name for layer in sparsity_report(model, exclude_dense=True).layers if layer.name not in head_names]


def expected_pattern(model: nn.Module) -> Optional[str]:
    meta = getattr(model.config, "spp_pruning", None) or {}
    pattern = meta.get("pattern")
    return pattern if pattern and pattern != "unstructured" else None


def eval_sets(tokenizer, section) -> dict[str, torch.Tensor]:
    """The token streams of the ``eval.datasets``, each cut to ``eval.max_tokens`` (tokenized once)."""
    from spp_peft.data import load_texts, token_stream

    sets = {}
    for name, source in section.datasets.items():
        ids = token_stream(tokenizer, load_texts(source))
        if section.max_tokens is not None:
            ids = ids[: section.max_tokens]
        usable = (ids.numel() // section.seqlen) * section.seqlen
        if usable == 0:
            raise ValueError(f"eval.datasets.{name} ({source}) has {ids.numel()} tokens, fewer than one "
                             f"window of eval.seqlen={section.seqlen}")
        sets[name] = ids[:usable]
    return sets


def evaluate(model: nn.Module, sets: dict[str, torch.Tensor], section, show_progress: bool = True) -> dict[str, float]:
    """Perplexity (WikiText-2 protocol) of ``model`` on every prepared set."""
    from spp_peft.evaluation import perplexity

    return {
        name: perplexity(model, ids, seqlen=section.seqlen, batch_size=section.batch_size,
                         show_progress=show_progress)
        for name, ids in sets.items()
    }


def zero_shot(model: nn.Module, tokenizer, section) -> Optional[dict[str, float]]:
    """lm-eval accuracies for ``eval.zero_shot_tasks`` (None when no task is asked for)."""
    tasks = expand_tasks(section.zero_shot_tasks)
    if not tasks:
        return None
    from spp_peft.evaluation import zero_shot as lm_eval_zero_shot

    return lm_eval_zero_shot(model, tokenizer, tasks, limit=section.zero_shot_limit, batch_size=section.batch_size)


def verify(reference: nn.Module, merged: nn.Module, layers: Optional[list[str]] = None) -> dict:
    """Check that ``merged`` has exactly the zero set of ``reference`` in every (pruned) linear layer.

    Returns ``{"ok", "layers", "message"}``; a :class:`SparsityViolation` is caught and reported, so that the
    report can show it, and the caller decides whether to stop (the pipeline does).
    """
    reference_weights = _state_of(reference, layers)
    try:
        changes = assert_same_sparsity(reference_weights, _state_of(merged, layers))
    except SparsityViolation as err:
        return {"ok": False, "layers": len(reference_weights), "message": str(err)}
    return {"ok": True, "layers": len(changes),
            "message": f"zero sets identical to the pruned base in all {len(changes)} pruned layers"}


def _state_of(model: Union[nn.Module, dict], layers: Optional[list[str]]) -> dict[str, torch.Tensor]:
    """``{name.weight: weight}`` (stored layout) of the given linear layers, for zero-set comparisons."""
    weights = linear_weights(model)
    names = layers if layers is not None else list(weights)
    return {f"{n}.weight": weights[n][0] for n in names if n in weights}


def sparsity_metadata(model: nn.Module, layers: list[str], method: str, pattern: Optional[str]) -> dict:
    """The ``spp_sparsity`` block of an exported config: totals and each pruned layer's mask record."""
    weights = linear_weights(model)
    records = {n: describe_mask(weights[n][0], weights[n][1]).to_dict() for n in layers if n in weights}
    total = sum(numel(r["shape"]) for r in records.values())
    zeros = sum(r["sparsity"] * numel(r["shape"]) for r in records.values())
    return {
        "method": method,
        "pattern": pattern,
        "total_sparsity": zeros / total if total else 0.0,
        "layers": records,
        "verified_against": "the pruned base (zero sets compared weight by weight)",
    }


def export_merged(
    model: nn.Module,
    tokenizer,
    out_dir: Union[str, os.PathLike],
    reference: nn.Module,
    layers: list[str],
    method: str,
    pattern: Optional[str] = None,
    overwrite: bool = True,
) -> Path:
    """Write a merged model as safetensors with its sparsity metadata, atomically and verified.

    The model goes to a temporary folder next to ``out_dir``; the files are read back, their zero sets
    compared with ``reference`` (the pruned base) and the recorded fingerprints checked; only then is the
    folder renamed to ``out_dir`` (replacing an older export only with ``overwrite``; see
    :func:`spp_peft._utils.atomic_write_dir`). On any failure ``out_dir`` is untouched.
    """
    from spp_peft._utils import atomic_write_dir

    meta = sparsity_metadata(model, layers, method, pattern)
    had = hasattr(model.config, SPARSITY_CONFIG_KEY)
    try:
        with atomic_write_dir(out_dir, overwrite=overwrite) as tmp:
            setattr(model.config, SPARSITY_CONFIG_KEY, meta)
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _check_export(tmp, reference, layers)
    finally:
        if not had and hasattr(model.config, SPARSITY_CONFIG_KEY):
            delattr(model.config, SPARSITY_CONFIG_KEY)
    return Path(out_dir).expanduser()


def _check_export(folder: Path, reference: nn.Module, layers: list[str]) -> None:
    """Verify what is on disk, not what is in memory: every pruned layer saved, with the reference's zero
    set and the fingerprint recorded in ``config.json``."""
    try:
        state = load_safetensors_folder(folder)
    except FileNotFoundError:
        raise RuntimeError(f"export: no safetensors file was written to {folder}") from None
    on_disk = {n: t for n, t in state.items() if n[: -len(".weight")] in set(layers)}
    if len(on_disk) != len(layers):
        missing = sorted(set(layers) - {n[: -len(".weight")] for n in on_disk})
        raise SparsityViolation(f"export: pruned layer(s) missing from the saved files: {missing[:3]}")
    assert_same_sparsity(_state_of(reference, layers), on_disk)
    saved_config = json.loads((folder / "config.json").read_text())
    recorded = saved_config.get(SPARSITY_CONFIG_KEY, {}).get("layers", {})
    for name, tensor in on_disk.items():
        layer = name[: -len(".weight")]
        if describe_mask(tensor).fingerprint != describe_mask(
                linear_weights(reference)[layer][0]).fingerprint or layer not in recorded:
            raise SparsityViolation(f"export: layer '{layer}' on disk does not match the recorded mask")


def environment() -> dict:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# ---------------------------------------------------------------------------------------- the run


@contextmanager
def _log_to(path: Path):
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("spp_peft")
    previous = root.level
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


class _Timer:
    """Wall-clock and process CPU seconds per stage (CPU time tells a busy machine from a slow stage)."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 2)
            self.cpu[name] = round(time.process_time() - cpu, 2)


def run(
    recipe: Union[Recipe, str, os.PathLike, dict, None],
    overrides: tuple = (),
    show_progress: bool = True,
    echo: Optional[Callable[[str], None]] = print,
    overwrite: bool = False,
) -> dict:
    """Run every stage of ``recipe`` and return the results (also written to ``report.json``).

    Args:
        recipe: a :class:`Recipe`, or anything :func:`spp_peft.recipe.load_recipe` reads.
        overrides: ``"KEY=VALUE"`` overrides when ``recipe`` is not already a :class:`Recipe`.
        show_progress: progress bars for pruning, training and evaluation.
        echo: where stage headlines and the final table go (``None`` for silence).
        overwrite: write into a non-empty output folder that holds something else than a run of this very
            recipe (see :func:`check_output_dir`).

    Raises:
        RecipeError: before any work, for a bad recipe or an empty ``output_dir``.
        OutputExistsError: before any work, for an output folder holding other things.
        SparsityViolation: when a merged or exported model does not keep the pruned base's zeros
            (the report is still written, with the failure).
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    from spp_peft.preflight import check_recipe_model

    check_recipe_model(recipe)  # targets and r against the model's skeleton: before anything is written
    say = echo or (lambda _msg: None)
    out = check_output_dir(recipe, overwrite)
    timer = _Timer()
    start = time.perf_counter()
    methods = list(recipe.train.methods)
    results: dict[str, Any] = {
        "name": recipe.name,
        "model": recipe.model.name_or_path,
        "output_dir": str(out),
        "recipe": recipe.to_dict(),
        "perplexity": {},
        "datasets": {},
        "training": {},
        "sparsity": {},
        "verified": {},
        "export": {},
        "zero_shot": {},
        "timings": timer.timings,
        "cpu_seconds": timer.cpu,
        "environment": environment(),
        "budget": {"steps": recipe.train.max_steps, "epochs": recipe.train.epochs,
                   "batch_size": recipe.train.batch_size * recipe.train.grad_accum, "seqlen": recipe.data.cutoff_len},
    }
    stages = 4 + len([m for m in methods if m != "none"])
    step = iter(range(1, stages + 1))

    def record_ppl(model_name: str, values: dict[str, float]) -> None:
        for ds, value in values.items():
            results["perplexity"].setdefault(ds, {})[model_name] = value

    with _claim(recipe, overwrite), _log_to(out / "run.log"):
        logger.debug("run %s: recipe %s", recipe.name, json.dumps(recipe.to_dict()))
        say(f"[{next(step)}/{stages}] loading {recipe.model.name_or_path}")
        with timer("load"):
            model, tokenizer = load(recipe.model)
            sets = eval_sets(tokenizer, recipe.eval)
        for name, ids in sets.items():
            results["datasets"][name] = {"source": recipe.eval.datasets[name], "tokens": int(ids.numel())}
        if recipe.eval.dense:
            with timer("eval dense"):
                record_ppl("dense", evaluate(model, sets, recipe.eval, show_progress))
                scores = zero_shot(model, tokenizer, recipe.eval)
                if scores:
                    results["zero_shot"]["dense"] = scores
            logger.info("dense perplexity: %s", {k: v.get("dense") for k, v in results["perplexity"].items()})

        say(f"[{next(step)}/{stages}] pruning: {recipe.pruning.method} "
            f"{recipe.pruning.pattern if recipe.pruning.pattern != 'unstructured' else recipe.pruning.sparsity}")
        with timer("prune"):
            pruning = prune_model(model, tokenizer, recipe.pruning, show_progress)
        layers = pruned_layers(model)
        if not layers:
            raise ValueError("the model has no zero weight after the pruning stage: nothing to preserve "
                             "(pruning.method is 'none' but the model is dense?)")
        pattern = expected_pattern(model)
        results["pruning"] = dict(getattr(model.config, "spp_pruning", None) or {"method": "none"})
        results["pruning"].pop("pruned_layers", None)
        results["sparsity"]["pruned"] = sparsity_report(model, include=layers, expected_pattern=pattern).to_dict()
        if recipe.export.save_pruned:
            with timer("save pruned"):
                _save_pruned(model, tokenizer, out / "pruned", pruning)
        with timer("eval pruned"):
            record_ppl("pruned", evaluate(model, sets, recipe.eval, show_progress))
            scores = zero_shot(model, tokenizer, recipe.eval)
            if scores:
                results["zero_shot"]["pruned"] = scores

        from spp_peft.training import build_dataset, merge, prepare_model, train

        dataset = None
        failures = []
        for method in methods:
            if method == "none":
                record_ppl("none", {ds: v["pruned"] for ds, v in results["perplexity"].items()})
                results["sparsity"]["none"] = results["sparsity"]["pruned"]
                results["verified"]["none"] = {"ok": True, "layers": len(layers), "message": "the pruned model itself"}
                continue
            if dataset is None:
                with timer("data"):
                    dataset = build_dataset(tokenizer, recipe.data)
                results["data"] = {"examples": len(dataset), "tokens": dataset.num_tokens}
            lr = recipe.train.lr_for(method)
            say(f"[{next(step)}/{stages}] fine-tuning {method} (lr {lr:g}), merging, verifying, evaluating")
            cfg = recipe.train.train_config()
            with timer(f"train {method}"):
                peft_model = prepare_model(copy.deepcopy(model), method, cfg)
                trained = train(peft_model, tokenizer, method, dataset, cfg, out / method, lr=lr,
                                data_description=dataclasses.asdict(recipe.data))
            results["training"][method] = trained.summary()
            with timer(f"merge+verify {method}"):
                merged = merge(peft_model, method)
                check = verify(model, merged, layers)
            results["verified"][method] = check
            results["sparsity"][method] = sparsity_report(merged, include=layers, expected_pattern=pattern).to_dict()
            if not check["ok"]:
                failures.append(f"{method}: {check['message']}")
                logger.error("%s: %s", method, check["message"])
            with timer(f"eval {method}"):
                record_ppl(method, evaluate(merged, sets, recipe.eval, show_progress))
                scores = zero_shot(merged, tokenizer, recipe.eval)
                if scores:
                    results["zero_shot"][method] = scores
            if method in recipe.export.methods and check["ok"]:
                with timer(f"export {method}"):
                    path = export_merged(merged, tokenizer, out / "merged" / method, model, layers, method, pattern)
                results["export"][method] = str(path)
            del peft_model, merged, trained
            gc.collect()

        say(f"[{next(step)}/{stages}] writing the report")
        results["seconds"] = round(time.perf_counter() - start, 1)
        from spp_peft.report import format_table, write_report

        with timer("report"):
            written = write_report(results, out, plots=recipe.report.plots)
        results["report"] = {k: str(v) for k, v in written.items()}
        say("")
        say(format_table(results))
        say(f"\nreport: {written['md']}  ({results['seconds'] / 60:.1f} min)")
    if failures:
        raise SparsityViolation("; ".join(failures))
    return results


def check_output_dir(recipe: Recipe, overwrite: bool = False) -> Path:
    """The run folder of ``recipe``, checked before any work: an empty ``output_dir`` (the current folder)
    is refused; so is a non-empty folder, unless ``overwrite`` or it holds a run of this very recipe and
    ``train.resume`` is on (the rerun continues it: checkpoints resume, every other output is rebuilt the
    same)."""
    from spp_peft._utils import check_output

    raw = recipe.output_dir.replace("{name}", recipe.name)
    if not raw.strip():
        raise RecipeError("output_dir is empty (it would write into the current folder); name the run folder")
    out = Path(raw).expanduser()
    resume = recipe.train.resume and _same_recipe(out / "recipe.yaml", recipe)
    try:
        return check_output(out, overwrite=overwrite or resume)
    except ValueError as err:  # a file where a folder should be, a read-only folder
        raise RecipeError(f"output_dir: {err}") from None


@contextmanager
def _claim(recipe: Recipe, overwrite: bool):
    """Hold the run folder for the whole run (a second run into it fails at once), check it again now that
    no other run can be writing there, and record the recipe."""
    from spp_peft._utils import atomic_write_file, exclusive

    with exclusive(recipe.out_dir) as out:
        check_output_dir(recipe, overwrite)
        if (out / "recipe.yaml").is_file() and not _same_recipe(out / "recipe.yaml", recipe):
            _clear_run(out)
        atomic_write_file(out / "recipe.yaml", recipe.to_yaml())
        yield out


def _clear_run(out: Path) -> None:
    """Remove the outputs of the previous run that ``--overwrite`` replaces, before the new run writes
    anything: otherwise a failure halfway would leave the new pruned base beside the old adapters. Files
    that are not part of a run's layout (module docstring) are left alone."""
    import shutil

    from spp_peft.training import METHODS

    entries = ("recipe.yaml", "run.log", "report.md", "report.json", "plots", "pruned", "merged", *METHODS)
    logger.warning("%s: --overwrite: removing the previous run (%s)", out, ", ".join(
        name for name in entries if (out / name).exists()))
    for name in entries:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _same_recipe(path: Path, recipe: Recipe) -> bool:
    """Whether ``path`` (a run's ``recipe.yaml``) is ``recipe``, up to settings that change no result."""
    import yaml

    from spp_peft.training import _VOLATILE

    def key(data) -> dict:
        train = {k: v for k, v in (data.get("train") or {}).items() if k not in _VOLATILE}
        return {**data, "train": train}

    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(stored, dict) and key(stored) == key(yaml.safe_load(recipe.to_yaml()))


def _save_pruned(model: nn.Module, tokenizer, folder: Path, pruning) -> None:
    from spp_peft.pruning import save_pruned

    # pruning None: an already-pruned input, saved as is. The run's output check came before any work.
    save_pruned(model, tokenizer, folder, pruning, overwrite=True)
