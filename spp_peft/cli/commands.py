"""The subcommands: each checks its flags before any work, then calls the pipeline's stage functions (the
stages are imported inside each command, so the parser loads none of them)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

from spp_peft.cli.parser import dataclass_from_flags, split_dotted, training_flags
from spp_peft.errors import RecipeError, reading
from spp_peft.recipe import (
    EvalSection,
    ModelSection,
    PruningSection,
    build_dataclass,
    check_eval,
    check_model,
    check_pruning,
    check_source,
    expand_tasks,
    load_recipe,
    quickstart_yaml,
    recipe_keys,
)


def cmd_run(args, extra) -> int:
    from spp_peft.pipeline import run

    overrides = list(args.set or []) + split_dotted(extra)
    source = quickstart_yaml() if args.command == "demo" else args.recipe
    if args.command == "demo":
        # The demo is offline by definition: never wait for hub time-outs.
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ.setdefault(key, "1")
    if getattr(args, "output_dir", None) is not None:  # --output-dir "" is refused by run(), not ignored
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(source, overrides)
    if args.print_recipe:
        print(recipe.to_yaml(), end="")
        return 0
    run(recipe, show_progress=not args.quiet, overwrite=args.overwrite)
    return 0


def cmd_keys(args, extra) -> int:
    for key, type_name, default, help_text in recipe_keys():
        print(f"{key:<32} {type_name:<28} {default!s:<24} {help_text}")
    return 0


def _output(path: str, overwrite: bool) -> Path:
    """``--output`` checked before any work: not empty, and not a non-empty folder unless ``--overwrite``."""
    from spp_peft._utils import check_output

    try:
        return check_output(path, overwrite)
    except ValueError as err:
        raise RecipeError(f"--output: {err}") from None


def _load_model(path: str, quantization=None):
    """The model and tokenizer of ``--model`` (``quantization``: loaded 4-bit / 8-bit); a truncated or broken
    file is an error naming it (exit 4)."""
    from spp_peft.models import load_model

    with reading(path, "--model"):
        return load_model(path, quantization=quantization)


def _quantization(args) -> dict:
    """``--load-in-4bit`` / ``--load-in-8bit`` and their settings, checked before any work."""
    from spp_peft.models import QuantizationFlags, check_quantization

    settings = dataclass_from_flags(args, QuantizationFlags, "quantization").settings()
    try:
        check_quantization(settings, "--load-in-4bit/--load-in-8bit")
    except ValueError as err:
        raise RecipeError(str(err)) from None
    return settings


def _load_merged(model, adapter: str):
    """``model`` with the adapter folder ``adapter`` loaded and merged; returns ``(merged, method)``."""
    from spp_peft.training import load_trained, merge

    with reading(adapter, "--adapter"):
        peft_model, method = load_trained(model, adapter)
    return merge(peft_model, method), method


def cmd_prune(args, extra) -> int:
    from spp_peft.pipeline import load, prune_model
    from spp_peft.pruning import save_pruned

    section = dataclass_from_flags(args, PruningSection, "pruning")
    if section.method == "none":
        raise RecipeError("prune: --method none does nothing; choose magnitude, wanda or sparsegpt")
    check_pruning(section)
    model_section = build_dataclass(ModelSection, {"name_or_path": args.model, "dtype": args.dtype}, "model")
    check_model(args.model, "--model")
    if section.method != "magnitude":
        check_source(section.calibration, "--calibration", "text")
    out = _output(args.output, args.overwrite)
    model, tokenizer = load(model_section)
    result = prune_model(model, tokenizer, section, show_progress=not args.quiet)
    save_pruned(model, tokenizer, out, result, overwrite=args.overwrite)
    print(result.report.format(max_rows=args.max_rows))
    print(f"pruned model saved to {out} ({result.seconds:.1f} s)")
    return 0


def cmd_train(args, extra) -> int:
    from spp_peft.preflight import check_adapter_targets, model_skeleton
    from spp_peft.training import DataConfig, TrainConfig, build_dataset, is_resume, prepare_model, train

    data = dataclass_from_flags(args, DataConfig, "data")
    cfg = dataclass_from_flags(args, TrainConfig, "train")
    cfg.args = {**cfg.args, **training_flags(extra)}
    if args.quiet:
        cfg.progress = False
    try:
        data.validate()
        cfg.validate()
    except ValueError as err:
        raise RecipeError(str(err)) from None
    quantization = _quantization(args)
    check_model(args.model, "--model")
    check_source(data.source, "--data", "text" if data.format == "text" else "records")
    check_adapter_targets(model_skeleton(args.model), cfg.target_modules, "train.target_modules",
                          cfg.r if args.method == "spp" else None)
    resume = args.resume_from_checkpoint
    _output(args.output, args.overwrite or is_resume(args.output, args.method, cfg, data=dataclasses.asdict(data),
                                                     resume_from_checkpoint=resume))
    model, tokenizer = _load_model(args.model, quantization)
    dataset = build_dataset(tokenizer, data)
    peft_model = prepare_model(model, args.method, cfg)
    result = train(peft_model, tokenizer, args.method, dataset, cfg, args.output,
                   data_description=dataclasses.asdict(data), resume_from_checkpoint=resume,
                   overwrite=args.overwrite)
    summary = result.summary()
    print(f"{args.method}: {summary['steps']} steps, loss {summary['first_loss']} -> {summary['final_loss']}, "
          f"{summary['seconds']:.0f} s; adapter saved to {result.adapter_dir}")
    return 0


def _reference_masks(model, layers):
    """The zero sets of the pruned layers as bool tensors (True where non-zero): what a merge must keep."""
    from spp_peft.sparsity import linear_weights

    weights = linear_weights(model)
    return {f"{n}.weight": weights[n][0].detach() != 0 for n in layers}


def cmd_merge(args, extra) -> int:
    from spp_peft.export import expected_pattern, export_merged, pruned_layers, verify
    from spp_peft.sparsity import SparsityViolation

    check_model(args.model, "--model")
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise RecipeError(f"--adapter {args.adapter} is not an adapter folder (no adapter_config.json)")
    out = _output(args.output, args.overwrite)
    model, tokenizer = _load_model(args.model)
    layers = pruned_layers(model)
    if not layers:
        raise RecipeError(f"--model {args.model} has no zero weight: merge expects the pruned base model")
    reference = _reference_masks(model, layers)
    pattern = expected_pattern(model)
    merged, method = _load_merged(model, args.adapter)
    check = verify(reference, merged, layers)
    if not check["ok"]:
        raise SparsityViolation(check["message"])
    export_merged(merged, tokenizer, out, reference, layers, method, pattern, overwrite=args.overwrite)
    print(f"{method}: merged, {check['message']}; saved to {out}")
    return 0


def _parse_datasets(items: Sequence[str]) -> dict[str, str]:
    datasets = {}
    for item in items:
        name, sep, source = item.partition("=")
        if not sep:
            name, source = Path(item).stem if not item.startswith("builtin") else item.split(":")[-1], item
        datasets[name] = source
    return datasets


def _eval_section(args) -> EvalSection:
    """``spp-peft eval``'s flags as an ``eval:`` section, every source and number checked."""
    check_model(args.model, "--model")
    datasets = _parse_datasets(args.data) if args.data else EvalSection().datasets
    for name, source in datasets.items():
        check_source(source, f"--data {name}", "text")
    section = dataclass_from_flags(args, EvalSection, "eval",
                                   base={"datasets": datasets, "zero_shot_tasks": args.tasks or []})
    check_eval(section)
    if section.zero_shot_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise RecipeError("--tasks needs lm-eval: pip install 'spp-peft[eval]'")
        from spp_peft.evaluation import check_tasks

        check_tasks(expand_tasks(section.zero_shot_tasks), section.include_path)  # before the model loads
    return section


def cmd_eval(args, extra) -> int:
    from spp_peft.export import pruned_layers
    from spp_peft.pipeline import evaluate, eval_sets, zero_shot
    from spp_peft.sparsity import sparsity_report

    section = _eval_section(args)
    model, tokenizer = _load_model(args.model)
    if args.adapter:
        model, _ = _load_merged(model, args.adapter)
    sets = eval_sets(tokenizer, section)
    layers = pruned_layers(model)
    results = {"model": args.model, "adapter": args.adapter,
               "perplexity": evaluate(model, sets, section, show_progress=not args.quiet),
               "tokens": {n: int(ids.numel()) for n, ids in sets.items()},
               "sparsity": sparsity_report(model, include=layers).total_sparsity if layers else 0.0}
    scores = zero_shot(model, tokenizer, section)
    if scores:
        results["zero_shot"] = scores
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for name, value in results["perplexity"].items():
        print(f"perplexity {name:<12} {value:10.3f}   ({results['tokens'][name]:,} tokens, {section.datasets[name]})")
    for task, acc in (scores or {}).items():
        print(f"zero-shot  {task:<12} {acc:10.4f}")
    print(f"sparsity of the pruned layers: {results['sparsity']:.2%}")
    return 0


def cmd_inspect(args, extra) -> int:
    from spp_peft.cli.inspect import inspect_path

    return inspect_path(Path(args.path), args.max_rows)


def cmd_autoload(args, extra) -> int:
    from spp_peft import autoload

    if args.action == "enable":
        try:
            print(f"autoload: enabled ({autoload.enable(args.target)})")
        except PermissionError as err:
            raise RecipeError(f"autoload: {err}; {autoload.user_site_note()}") from None
    elif args.action == "disable":
        removed = autoload.disable(args.target)
        print(f"autoload: disabled ({'removed' if removed else 'there was no'} {autoload.pth_path(args.target)})")
    else:
        print(autoload.status(args.target))
    return 0


#: ``{subcommand: function(args, extra) -> exit code}``; ``estimate`` is dispatched apart (its own parser).
COMMANDS = {
    "run": cmd_run, "demo": cmd_run, "keys": cmd_keys, "prune": cmd_prune, "train": cmd_train,
    "merge": cmd_merge, "eval": cmd_eval, "inspect": cmd_inspect, "autoload": cmd_autoload,
}
