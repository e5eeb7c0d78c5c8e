"""``spp-peft``: the command line. Argument parsing only; every subcommand calls the pipeline's stages.

    spp-peft demo                                   # the quickstart recipe on the built-in SmolLM2, offline
    spp-peft run configs/quickstart.yaml --set train.lr=3e-2 --train.max_steps 10
    spp-peft prune --model smollm2 --pattern 2:4 --nsamples 32 --seqlen 256 --output runs/x/pruned
    spp-peft train --model runs/x/pruned --method spp --lr 3e-2 --max-steps 20 --output runs/x/spp
    spp-peft merge --model runs/x/pruned --adapter runs/x/spp/adapter --output runs/x/merged
    spp-peft eval --model runs/x/merged --data heldout=builtin:heldout --data ood=builtin:ood
    spp-peft inspect runs/x/merged                  # a model, an adapter or a run folder
    spp-peft estimate --model smollm2               # memory estimate (spp_peft.estimate)

Flags of ``prune`` and ``train`` are the keys of the recipe's ``pruning:`` / ``data:`` + ``train:`` sections,
generated from the same dataclasses (``--max-steps`` or ``--max_steps``). ``run`` and ``demo`` accept any
recipe key as ``--set KEY=VALUE`` or ``--KEY VALUE`` with a dotted key (``--train.lr 3e-2``).

Every expected failure is one line on stderr (``spp-peft COMMAND: error: ...`` naming the file, key or
value) and an exit code; ``-v`` / ``--debug`` adds the traceback. Exit codes (see
:data:`spp_peft.cli_errors.EXIT_CODES_HELP`): 0 success, 1 unexpected error (a bug), 2 bad input (recipe,
flags, values, missing or empty files), 3 sparsity violation, 4 I/O error (disk full, unreadable or
truncated file), 5 training diverged (nothing saved), 130 interrupted (Ctrl-C), 141 output closed early
(``| head``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from spp_peft.recipe import (
    QUICKSTART_YAML,
    PruningSection,
    RecipeError,
    build_dataclass,
    check_model,
    check_pruning,
    check_source,
    load_recipe,
    parse_value,
    recipe_keys,
)
from spp_peft.cli_errors import (  # noqa: F401 (the exit codes are part of the CLI's interface)
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_SPARSITY,
    guarded,
)
from spp_peft.errors import quote, reading
from spp_peft.training import METHODS, DataConfig, TrainConfig

#: The flags that show tracebacks; accepted before or after the command.
DEBUG_FLAGS = ("-v", "--verbose", "--debug")

# ----------------------------------------------------------------------------------- flag generation


def _flag_names(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    plain = "--" + name
    return [dashed] if dashed == plain else [dashed, plain]


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str, skip: Sequence[str] = (),
                        rename: Optional[dict[str, str]] = None) -> None:
    """One flag per field of ``cls`` (help and type from the field); values stay strings until
    :func:`dataclass_from_flags` reads them with the field's type."""
    rename = rename or {}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{prefix} options")
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = _flag_names(rename.get(f.name, f.name))
        if f.name in rename:
            names += _flag_names(f.name)
        tp = hints[f.name]
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata.get('help', '')} [{prefix}.{f.name}, default: {default}]"
        group.add_argument(*names, dest=f"{prefix}__{f.name}", default=None, metavar=_metavar(tp),
                           help=help_text.replace("%", "%%"))


def _metavar(tp) -> str:
    from spp_peft.recipe import _type_name

    return _type_name(tp).upper().replace(" ", "_")


def dataclass_from_flags(args: argparse.Namespace, cls, prefix: str, base: Optional[dict] = None):
    """Build ``cls`` from the flags :func:`add_dataclass_flags` added (typed and validated)."""
    hints = typing.get_type_hints(cls)
    data = dict(base or {})
    for f in dataclasses.fields(cls):
        raw = getattr(args, f"{prefix}__{f.name}", None)
        if raw is not None:
            data[f.name] = parse_value(raw, hints[f.name], f"{prefix}.{f.name}")
    return build_dataclass(cls, data, prefix)


def split_dotted(extra: Sequence[str]) -> list[str]:
    """``--a.b VALUE`` / ``--a.b=VALUE`` tokens left over by argparse, as ``a.b=VALUE`` overrides."""
    overrides, i = [], 0
    extra = list(extra)
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise RecipeError(f"unrecognized argument {quote(token)} (recipe keys look like --train.lr 3e-2)")
        if "=" in token:
            overrides.append(token[2:])
            i += 1
        else:
            if i + 1 >= len(extra):
                raise RecipeError(f"{token} needs a value")
            overrides.append(f"{token[2:]}={extra[i + 1]}")
            i += 2
    return overrides


# ---------------------------------------------------------------------------------------- commands


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("spp_peft").setLevel(logging.DEBUG if verbose else logging.INFO)
    if quiet:  # -q means no progress bars, transformers' own ("Loading weights") included
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def cmd_run(args, extra) -> int:
    from spp_peft.pipeline import run

    overrides = list(args.set or []) + split_dotted(extra)
    source = QUICKSTART_YAML if args.command == "demo" else args.recipe
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


def cmd_prune(args, extra) -> int:
    from spp_peft.pipeline import load, prune_model
    from spp_peft.pruning import save_pruned
    from spp_peft.recipe import ModelSection

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


def _output(path: str, overwrite: bool) -> Path:
    """``--output`` checked before any work: not empty, and not a non-empty folder unless ``--overwrite``."""
    from spp_peft._utils import check_output

    try:
        return check_output(path, overwrite)
    except ValueError as err:
        raise RecipeError(f"--output: {err}") from None


def cmd_train(args, extra) -> int:
    from spp_peft.training import build_dataset, prepare_model, train

    data = dataclass_from_flags(args, DataConfig, "data")
    cfg = dataclass_from_flags(args, TrainConfig, "train")
    if args.quiet:
        cfg.progress = False
    try:
        data.validate()
        cfg.validate()
    except ValueError as err:
        raise RecipeError(str(err)) from None
    check_model(args.model, "--model")
    check_source(data.source, "--data", "text" if data.format == "text" else "records")
    from spp_peft.preflight import check_adapter_targets, model_skeleton
    from spp_peft.training import is_resume

    check_adapter_targets(model_skeleton(args.model), cfg.target_modules, "train.target_modules",
                          cfg.r if args.method == "spp" else None)
    _output(args.output, args.overwrite or is_resume(args.output, args.method, cfg, data=dataclasses.asdict(data)))
    model, tokenizer = _load_model(args.model)
    dataset = build_dataset(tokenizer, data)
    peft_model = prepare_model(model, args.method, cfg)
    result = train(peft_model, tokenizer, args.method, dataset, cfg, args.output,
                   data_description=dataclasses.asdict(data))
    summary = result.summary()
    print(f"{args.method}: {summary['steps']} steps, loss {summary['first_loss']} -> {summary['final_loss']}, "
          f"{summary['seconds']:.0f} s; adapter saved to {result.adapter_dir}")
    return 0


def _load_model(path: str):
    """The model and tokenizer of ``--model``; a truncated or broken file is an error naming it (exit 4)."""
    from spp_peft.models import load_model

    with reading(path, "--model"):
        return load_model(path)


def _reference_masks(model, layers):
    """The zero sets of the pruned layers as bool tensors (True where non-zero): what a merge must keep."""
    from spp_peft.sparsity import linear_weights

    weights = linear_weights(model)
    return {f"{n}.weight": weights[n][0].detach() != 0 for n in layers}


def cmd_merge(args, extra) -> int:
    from spp_peft.export import expected_pattern, export_merged, pruned_layers, verify
    from spp_peft.sparsity import SparsityViolation
    from spp_peft.training import load_trained, merge

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
    with reading(args.adapter, "--adapter"):
        peft_model, method = load_trained(model, args.adapter)
    merged = merge(peft_model, method)
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


def cmd_eval(args, extra) -> int:
    from spp_peft.export import pruned_layers
    from spp_peft.pipeline import evaluate, eval_sets, zero_shot
    from spp_peft.recipe import EvalSection, check_eval
    from spp_peft.sparsity import sparsity_report

    check_model(args.model, "--model")
    datasets = _parse_datasets(args.data) if args.data else EvalSection().datasets
    for name, source in datasets.items():
        check_source(source, f"--data {name}", "text")
    section = build_dataclass(EvalSection, {
        "datasets": datasets, "seqlen": args.seqlen, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
        "zero_shot_tasks": args.tasks or [], "zero_shot_limit": args.limit,
    }, "eval")
    check_eval(section)
    if section.zero_shot_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise RecipeError("--tasks needs lm-eval: pip install 'spp-peft[eval]'")
    model, tokenizer = _load_model(args.model)
    if args.adapter:
        from spp_peft.training import load_trained, merge

        with reading(args.adapter, "--adapter"):
            peft_model, method = load_trained(model, args.adapter)
        model = merge(peft_model, method)
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
    else:
        for name, value in results["perplexity"].items():
            print(f"perplexity {name:<12} {value:10.3f}   ({results['tokens'][name]:,} tokens, {datasets[name]})")
        for task, acc in (scores or {}).items():
            print(f"zero-shot  {task:<12} {acc:10.4f}")
        print(f"sparsity of the pruned layers: {results['sparsity']:.2%}")
    return 0


def cmd_inspect(args, extra) -> int:
    from spp_peft.cli_inspect import inspect_path

    return inspect_path(Path(args.path), args.max_rows)


def cmd_estimate(argv: Sequence[str]) -> int:
    """``spp-peft estimate ...``: the options and the work belong to :mod:`spp_peft.estimate` (imported here,
    lazily, so the rest of the CLI works without it)."""
    try:
        from spp_peft import estimate
    except ImportError as err:
        print(f"spp-peft estimate: error: the memory estimate is not available in this installation: {err}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog="spp-peft estimate", description="Estimate the memory of SPP training.")
    estimate.add_estimate_arguments(parser)
    return int(estimate.run_estimate(parser.parse_args(list(argv))) or 0)


# ------------------------------------------------------------------------------------------ parser


def _debug_parent() -> argparse.ArgumentParser:
    """``-v`` after the command too; SUPPRESS keeps a subcommand from resetting a ``-v`` given before it."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(*DEBUG_FLAGS, dest="verbose", action="store_true", default=argparse.SUPPRESS,
                       help="Debug logging, and the traceback of an error.")
    return debug


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spp-peft",
        description="Prune, fine-tune with SPP, merge, verify, evaluate and export sparse LLMs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXIT_CODES_HELP,
    )
    parser.add_argument(*DEBUG_FLAGS, dest="verbose", action="store_true",
                        help="Debug logging, and the traceback of an error.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[_debug_parent()], epilog=EXIT_CODES_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def common(p):
        p.add_argument("-q", "--quiet", action="store_true", help="No progress bars.")

    for name, text in (("run", "Run every stage of a recipe (YAML)."),
                       ("demo", "The quickstart recipe on the built-in SmolLM2-135M, offline (~10 min on 2 cores).")):
        p = add(name, help=text, description=text + " Any recipe key can be overridden with "
                "--set KEY=VALUE or --KEY VALUE (dotted key, e.g. --train.lr 3e-2).")
        if name == "run":
            p.add_argument("recipe", help="Recipe YAML file (see configs/).")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
        p.add_argument("--output-dir", help="Shortcut for --set output_dir=DIR.")
        p.add_argument("--print-recipe", action="store_true", help="Print the resolved recipe and exit.")
        p.add_argument("--overwrite", action="store_true",
                       help="Write into a non-empty output folder (a rerun of the same recipe resumes without it).")
        common(p)

    p = add("keys", help="List every recipe key with its type, default and help.")

    p = add("prune", help="Prune a model and save it (safetensors + pruning metadata).")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a model folder.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--output", required=True, help="Folder for the pruned model.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    p.add_argument("--max-rows", type=int, default=12, help="Rows of the sparsity table to print.")
    add_dataclass_flags(p, PruningSection, "pruning")
    common(p)

    p = add("train", help="Fine-tune a pruned model with one method and save the adapter.")
    p.add_argument("--model", required=True, help="The pruned model folder.")
    p.add_argument("--method", default="spp", choices=[m for m in METHODS if m != "none"])
    p.add_argument("--output", required=True, help="Folder for checkpoints/, adapter/ and train_log.json.")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into a non-empty --output (a rerun with the same settings resumes without it).")
    add_dataclass_flags(p, DataConfig, "data", rename={"source": "data"})
    add_dataclass_flags(p, TrainConfig, "train")
    common(p)

    p = add("merge", help="Merge an adapter into its pruned base, verify the zeros, export.")
    p.add_argument("--model", required=True, help="The pruned base model folder.")
    p.add_argument("--adapter", required=True, help="The adapter folder (from train).")
    p.add_argument("--output", required=True, help="Folder for the merged model.")
    p.add_argument("--overwrite", action="store_true", help="Replace a non-empty --output.")
    common(p)

    p = add("eval", help="Perplexity (WikiText-2 protocol) and optional lm-eval zero-shot tasks.")
    p.add_argument("--model", required=True, help="'smollm2' or a model folder.")
    p.add_argument("--adapter", help="An adapter to load and merge first.")
    p.add_argument("--data", action="append", metavar="[NAME=]SOURCE",
                   help="Evaluation text (repeatable); default: heldout=builtin:heldout and ood=builtin:ood.")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", nargs="*", help="lm-eval tasks, or 'paper7' (needs lm-eval).")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: examples per task.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    common(p)

    p = add("inspect", help="Sparsity and metadata of a model folder, an adapter or a run folder.")
    p.add_argument("path")
    p.add_argument("--max-rows", type=int, default=20)

    # Listed for --help only: main() hands `estimate ...` to spp_peft.estimate's own parser.
    sub.add_parser("estimate", help="Estimate the memory of SPP training (spp_peft.estimate).", add_help=False)
    return parser


COMMANDS = {
    "run": cmd_run, "demo": cmd_run, "keys": cmd_keys, "prune": cmd_prune, "train": cmd_train,
    "merge": cmd_merge, "eval": cmd_eval, "inspect": cmd_inspect,
}
#: Subcommands that accept dotted recipe flags after the known ones.
DOTTED = ("run", "demo")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit code (see :data:`~spp_peft.cli_errors.EXIT_CODES_HELP`)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    leading = 0
    while leading < len(argv) and argv[leading] in DEBUG_FLAGS:
        leading += 1
    if argv[leading:leading + 1] == ["estimate"]:
        rest = argv[leading + 1:]
        debug = leading > 0 or any(a in DEBUG_FLAGS for a in rest)
        return guarded("estimate", lambda: cmd_estimate([a for a in rest if a not in DEBUG_FLAGS]), debug)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in DOTTED:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose, getattr(args, "quiet", False))
    return guarded(args.command, lambda: COMMANDS[args.command](args, extra), debug=args.verbose)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
