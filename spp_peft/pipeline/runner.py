"""The whole job from a recipe: :func:`run` chains the stages (load, prune, fine-tune each method with merge,
verification, evaluation and export, report) and returns the :class:`~spp_peft.results.RunResults` that
``report.json`` holds. Each stage is a function of a screen over a :class:`_Run` (the recipe, the run
folder, the results so far) and the :class:`_Base` (the pruned model and what the stages share about it).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from spp_peft.export.safetensors import expected_pattern, export_merged, pruned_layers, verify
from spp_peft.recipe import Recipe, load_recipe
from spp_peft.results import Budget, EvalSet, ModelResult, RunResults, TrainingData, Verification
from spp_peft.sparsity import SparsityViolation, sparsity_report

from .folder import check_output_dir, claim_output_dir, log_to
from .stages import environment, eval_sets, evaluate, load, prune_model, zero_shot

logger = logging.getLogger("spp_peft.pipeline")


def run(
    recipe: Union[Recipe, str, os.PathLike, dict, None],
    overrides: tuple = (),
    show_progress: bool = True,
    echo: Optional[Callable[[str], None]] = print,
    overwrite: bool = False,
) -> RunResults:
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
    out = check_output_dir(recipe, overwrite)
    current = _Run(recipe, out, show_progress, echo or (lambda _msg: None), overwrite)
    with claim_output_dir(recipe, overwrite), log_to(out / "run.log"):
        logger.debug("run %s: recipe %s", recipe.name, json.dumps(recipe.to_dict()))
        base = _load_stage(current)
        _prune_stage(current, base)
        failures = [failure for method, kind in _variants(recipe)
                    if (failure := _method_stage(current, base, method, kind))]
        _report_stage(current)
    if failures:
        raise SparsityViolation("; ".join(failures))
    return current.results


@dataclass
class _Run:
    """A run in progress: its recipe and folder, the results so far, the headline counter."""

    recipe: Recipe
    out: Path
    show_progress: bool
    say: Callable[[str], None]
    overwrite: bool = False  # also lets training replace checkpoints it would not continue
    start: float = field(default_factory=time.perf_counter)
    results: RunResults = field(init=False)
    steps: int = field(init=False)
    step: int = 0
    dataset: Any = None

    def __post_init__(self):
        recipe, train = self.recipe, self.recipe.train
        self.results = RunResults(
            name=recipe.name, model=recipe.model.name_or_path, output_dir=str(self.out), recipe=recipe.to_dict(),
            environment=environment(),
            budget=Budget.governing(train.max_steps, train.epochs, train.batch_size * train.grad_accum,
                                    recipe.data.cutoff_len))
        self.steps = 4 + len([m for m, _kind in _variants(recipe) if m != "none"])

    def headline(self, text: str) -> None:
        self.step += 1
        self.say(f"[{self.step}/{self.steps}] {text}")

    @contextmanager
    def timed(self, stage: str):
        """Record the stage's wall-clock and process CPU seconds in the results."""
        start, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.results.timings.wall[stage] = round(time.perf_counter() - start, 2)
            self.results.timings.cpu[stage] = round(time.process_time() - cpu, 2)


@dataclass
class _Base:
    """The model every method starts from (pruned in place by the prune stage), and what is checked on it."""

    model: nn.Module
    tokenizer: Any
    sets: dict[str, torch.Tensor]
    layers: list[str] = field(default_factory=list)
    pattern: Optional[str] = None


def _measure(current: _Run, base: _Base, name: str, model: nn.Module) -> ModelResult:
    """Perplexity on every evaluation set and the zero-shot scores of one model."""
    section = current.recipe.eval
    with current.timed(f"eval {name}"):
        ppl = evaluate(model, base.sets, section, current.show_progress)
        scores = zero_shot(model, base.tokenizer, section)
    return ModelResult(name, perplexity=ppl, zero_shot=scores)


def _load_stage(current: _Run) -> _Base:
    recipe = current.recipe
    current.headline(f"loading {recipe.model.name_or_path}")
    with current.timed("load"):
        model, tokenizer = load(recipe.model)
        sets = eval_sets(tokenizer, recipe.eval)
    for name, ids in sets.items():
        current.results.datasets[name] = EvalSet(source=recipe.eval.datasets[name], tokens=int(ids.numel()))
    base = _Base(model, tokenizer, sets)
    if recipe.eval.dense:
        dense = _measure(current, base, "dense", model)
        current.results.add(dense)
        logger.info("dense perplexity: %s", dense.perplexity)
    return base


def _prune_stage(current: _Run, base: _Base) -> None:
    section = current.recipe.pruning
    current.headline(f"pruning: {section.method} "
                     f"{section.pattern if section.pattern != 'unstructured' else section.sparsity}")
    with current.timed("prune"):
        pruning = prune_model(base.model, base.tokenizer, section, current.show_progress)
    base.layers = pruned_layers(base.model)
    if not base.layers:
        raise ValueError("the model has no zero weight after the pruning stage: nothing to preserve "
                         "(pruning.method is 'none' but the model is dense?)")
    base.pattern = expected_pattern(base.model)
    metadata = dict(getattr(base.model.config, "spp_pruning", None) or {"method": "none"})
    metadata.pop("pruned_layers", None)
    current.results.pruning = metadata
    report = sparsity_report(base.model, include=base.layers, expected_pattern=base.pattern).to_dict()
    if current.recipe.export.save_pruned:
        from spp_peft.pruning import save_pruned

        with current.timed("save pruned"):
            # pruning None: an already-pruned input, saved as is. The run's output check came before any work.
            save_pruned(base.model, base.tokenizer, current.out / "pruned", pruning, overwrite=True)
    pruned = _measure(current, base, "pruned", base.model)
    pruned.sparsity = report
    current.results.add(pruned)


def _variants(recipe: Recipe) -> list[tuple[str, Optional[str]]]:
    """``(method, quantized kind or None)`` for every training of the run: with ``model.quantization`` each
    method trains on the quantized base, and also on the full-precision one with ``compare_full_precision``."""
    from spp_peft.models import check_quantization

    kind = check_quantization(recipe.model.quantization)
    methods = recipe.train.methods
    if kind is None:
        return [(m, None) for m in methods]
    quantized = [(m, kind) for m in methods if m != "none"]
    full = [(m, None) for m in methods] if recipe.model.compare_full_precision else []
    return full + quantized if full else [(m, None) for m in methods if m == "none"] + quantized


def _method_stage(current: _Run, base: _Base, method: str, kind: Optional[str] = None) -> Optional[str]:
    """Fine-tune, merge, verify, evaluate and (``export.methods``) export one method; returns the
    verification failure, if any (the run goes on, so that the report shows every method).

    ``kind`` ("4bit" / "8bit"): trained on the pruned model loaded quantized, then merged into the
    full-precision pruned model (the QLoRA deployment); the row is ``f"{method}_{kind}"``."""
    results = current.results
    if method == "none":
        results.add(ModelResult("none", perplexity={ds: v["pruned"] for ds, v in results.perplexity.items()},
                                sparsity=results.sparsity["pruned"],
                                verified=Verification(True, len(base.layers), "the pruned model itself")))
        return None
    name = method if kind is None else f"{method}_{kind}"
    peft_model, trained = _train(current, base, method, kind)
    with current.timed(f"merge+verify {name}"):
        merged = _merged(base, peft_model, method, kind, trained.adapter_dir)
        check = Verification.from_dict(verify(base.model, merged, base.layers))
    report = sparsity_report(merged, include=base.layers, expected_pattern=base.pattern).to_dict()
    if not check.ok:
        logger.error("%s: %s", name, check.message)
    result = _measure(current, base, name, merged)
    result.training, result.verified, result.sparsity = trained.summary(), check, report
    result.training["trained_on"] = _base_description(current.recipe, kind)
    if method in current.recipe.export.methods and check.ok:
        with current.timed(f"export {name}"):
            path = export_merged(merged, base.tokenizer, current.out / "merged" / name, base.model, base.layers,
                                 method, base.pattern)
        result.export = str(path)
    results.add(result)
    del peft_model, merged, trained
    gc.collect()
    return None if check.ok else f"{name}: {check.message}"


def _base_description(recipe: Recipe, kind: Optional[str]) -> dict:
    """Which base the adapter trained on, for the results (a quantized one is merged into full precision)."""
    if kind is None:
        return {"base": "full precision", "dtype": recipe.model.dtype}
    return {"base": kind, "quantization": dict(recipe.model.quantization),
            "merged_into": f"full-precision pruned model ({recipe.model.dtype})"}


def _merged(base: _Base, peft_model, method: str, kind: Optional[str], adapter_dir) -> nn.Module:
    """The merged model: in place, or (quantized ``kind``) the saved adapter merged into a copy of the
    full-precision pruned model, as :func:`spp_peft.merge_into` does for SPP."""
    from spp_peft.training import load_trained, merge

    if kind is None:
        return merge(peft_model, method)
    full, _ = load_trained(copy.deepcopy(base.model), adapter_dir)
    return merge(full, method)


def _train(current: _Run, base: _Base, method: str, kind: Optional[str] = None):
    """The trained PEFT model of ``method`` (on a copy of the base, or on the saved pruned model loaded
    quantized) and its ``TrainResult``."""
    from spp_peft.training import build_dataset, prepare_model, train

    recipe = current.recipe
    if current.dataset is None:
        with current.timed("data"):
            current.dataset = build_dataset(base.tokenizer, recipe.data)
        current.results.data = TrainingData(examples=len(current.dataset), tokens=current.dataset.num_tokens)
    lr = recipe.train.lr_for(method)
    name = method if kind is None else f"{method}_{kind}"
    on = "" if kind is None else f" on the {kind} base"
    current.headline(f"fine-tuning {method}{on} (lr {lr:g}), merging, verifying, evaluating")
    cfg = recipe.train.train_config()
    with current.timed(f"train {name}"):
        model = copy.deepcopy(base.model) if kind is None else _quantized_base(current)
        peft_model = prepare_model(model, method, cfg)
        trained = train(peft_model, base.tokenizer, method, current.dataset, cfg, current.out / name, lr=lr,
                        data_description=dataclasses.asdict(recipe.data), overwrite=current.overwrite)
    return peft_model, trained


def _quantized_base(current: _Run) -> nn.Module:
    """The saved pruned model loaded quantized (pruning needs full precision, so it ran before)."""
    from spp_peft.models import load_model
    from spp_peft._utils import parse_dtype

    model_section = current.recipe.model
    model, _ = load_model(str(current.out / "pruned"), dtype=parse_dtype(model_section.dtype),
                          quantization=model_section.quantization)
    return model


def _report_stage(current: _Run) -> None:
    from spp_peft.report import format_table, write_report

    current.headline("writing the report")
    results = current.results
    results.timings.total = round(time.perf_counter() - current.start, 1)
    with current.timed("report"):
        written = write_report(results, current.out, plots=current.recipe.report.plots)
    results.report_files = {k: str(v) for k, v in written.items()}
    current.say("")
    current.say(format_table(results))
    current.say(f"\nreport: {written['md']}  ({results.timings.total / 60:.1f} min)")
