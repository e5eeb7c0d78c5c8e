"""The ``spp-peft`` argument parser. The settings flags of ``prune``, ``train`` and ``eval`` are generated
from the recipe's section dataclasses (one flag per field, help, type and default from the field), so the
recipe keys and the flags never drift apart: ``--max-steps`` or ``--max_steps`` is ``train.max_steps``, a
key with a ``TrainingArguments`` name has it as its flag (``--learning-rate``; ``--lr`` stays an alias), and
a bool key is a bare flag (``--bf16`` / ``--no-bf16``). ``train``'s other ``TrainingArguments`` flags go to
``train.args`` (:func:`training_flags`).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional, Sequence

from spp_peft.cli.errors import EXIT_CODES_HELP
from spp_peft.errors import RecipeError, quote
from spp_peft.models import QuantizationFlags
from spp_peft.recipe import EvalSection, PruningSection, build_dataclass, field_type, parse_value, type_name
from spp_peft.training.config import METHODS, DataConfig, TrainConfig

#: The flags that show tracebacks; accepted before or after the command.
DEBUG_FLAGS = ("-v", "--verbose", "--debug")

# ----------------------------------------------------------------------------------- flag generation


def _flag_names(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    plain = "--" + name
    return [dashed] if dashed == plain else [dashed, plain]


class BoolFlag(argparse.Action):
    """A bool field's flag: ``--flag`` (true), ``--no-flag`` (false) or ``--flag VALUE`` (``true``/``false``).

    The value is kept as a string, like every generated flag, and read with the field's type later."""

    def __init__(self, option_strings, dest, **kwargs):
        negative = [f"--no-{name[2:]}" for name in option_strings]
        super().__init__(option_strings + negative, dest, nargs="?", **kwargs)
        self.negative = set(negative)

    def __call__(self, parser, namespace, value, option_string=None):
        if option_string in self.negative:
            if value is not None:
                parser.error(f"{option_string} takes no value")
            value = "false"
        setattr(namespace, self.dest, "true" if value is None else value)


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str, skip: Sequence[str] = (),
                        rename: Optional[dict[str, str]] = None) -> None:
    """One flag per field of ``cls`` (help and type from the field); values stay strings until
    :func:`dataclass_from_flags` reads them with the field's type."""
    # TrainingArguments' names first (--learning-rate), the short field names (--lr) stay as aliases.
    rename = {**{field: alias for alias, field in getattr(cls, "ALIASES", {}).items()}, **(rename or {})}
    types_ = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{prefix} options")
    defaults = cls()
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        names = _flag_names(rename.get(f.name, f.name))
        if f.name in rename:
            names += _flag_names(f.name)
        tp = types_[f.name]
        key = rename.get(f.name, f.name) if prefix == "train" else f.name
        help_text = f"{f.metadata.get('help', '')} [{prefix}.{key}, default: {getattr(defaults, f.name)}]"
        group.add_argument(*names, dest=f"{prefix}__{f.name}", default=None, help=help_text.replace("%", "%%"),
                           metavar=type_name(tp).upper().replace(" ", "_"), action=BoolFlag if tp is bool else None)


def dataclass_from_flags(args: argparse.Namespace, cls, prefix: str, base: Optional[dict] = None):
    """Build ``cls`` from the flags :func:`add_dataclass_flags` added (typed and validated)."""
    types_ = typing.get_type_hints(cls)
    data = dict(base or {})
    for f in dataclasses.fields(cls):
        raw = getattr(args, f"{prefix}__{f.name}", None)
        if raw is not None:
            data[f.name] = parse_value(raw, types_[f.name], f"{prefix}.{f.name}")
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
        elif (i + 1 >= len(extra) or extra[i + 1].startswith("--")) and field_type(token[2:]) is bool:
            overrides.append(f"{token[2:]}=true")  # a bare bool key: --train.bf16
            i += 1
        else:
            if i + 1 >= len(extra):
                raise RecipeError(f"{token} needs a value")
            overrides.append(f"{token[2:]}={extra[i + 1]}")
            i += 2
    return overrides


def training_flags(extra: Sequence[str]) -> dict:
    """``spp-peft train``'s flags that are other ``TrainingArguments`` fields (``--report_to wandb``,
    ``--label-smoothing-factor 0.1``, a bare ``--torch_compile``), typed by the field; an unknown one is a
    RecipeError with a "did you mean"."""
    from spp_peft.recipe.values import unknown_key
    from spp_peft.training.arguments import hf_fields

    fields, values, tokens = hf_fields(), {}, list(extra)
    while tokens:
        token = tokens.pop(0)
        name, sep, raw = token[2:].partition("=")
        name = name.replace("-", "_")
        if not token.startswith("--") or name not in fields:
            raise unknown_key(name if token.startswith("--") else token, [], "train", list(fields))
        if not sep:
            bare = fields[name] is bool and (not tokens or tokens[0].startswith("--"))
            if not bare and not tokens:
                raise RecipeError(f"{token} needs a value")
            raw = "true" if bare else tokens.pop(0)
        values[name] = parse_value(raw, fields[name], f"train.args.{name}")
    return values


# ------------------------------------------------------------------------------------- subcommands


def _debug_parent() -> argparse.ArgumentParser:
    """``-v`` after the command too; SUPPRESS keeps a subcommand from resetting a ``-v`` given before it."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(*DEBUG_FLAGS, dest="verbose", action="store_true", default=argparse.SUPPRESS,
                       help="Debug logging, and the traceback of an error.")
    return debug


def _quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="No progress bars.")


def _output_flags(p: argparse.ArgumentParser, what: str, overwrite: str = "Replace a non-empty --output.") -> None:
    p.add_argument("--output", required=True, help=what)
    p.add_argument("--overwrite", action="store_true", help=overwrite)


def _add_run(add, name: str, text: str) -> None:
    p = add(name, help=text, description=text + " Any recipe key can be overridden with "
            "--set KEY=VALUE or --KEY VALUE (dotted key, e.g. --train.lr 3e-2).")
    if name == "run":
        p.add_argument("recipe", help="Recipe YAML file (see configs/).")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
    p.add_argument("--output-dir", help="Shortcut for --set output_dir=DIR.")
    p.add_argument("--print-recipe", action="store_true", help="Print the resolved recipe and exit.")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into a non-empty output folder (a rerun of the same recipe resumes without it).")
    _quiet(p)


def _add_prune(add) -> None:
    p = add("prune", help="Prune a model and save it (safetensors + pruning metadata).")
    p.add_argument("--model", default="smollm2", help="'smollm2' or a model folder.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    _output_flags(p, "Folder for the pruned model.")
    p.add_argument("--max-rows", type=int, default=12, help="Rows of the sparsity table to print.")
    add_dataclass_flags(p, PruningSection, "pruning")
    _quiet(p)


def _add_train(add) -> None:
    p = add("train", help="Fine-tune a pruned model with one method and save the adapter.",
            description="Fine-tune a pruned model with one method and save the adapter. Any other "
            "transformers.TrainingArguments field is a flag too (--report_to wandb, --label_smoothing_factor 0.1).")
    p.add_argument("--model", required=True, help="The pruned model folder.")
    p.add_argument("--method", default="spp", choices=[m for m in METHODS if m != "none"])
    _output_flags(p, "Folder for checkpoints/, adapter/ and train_log.json.",
                  "Write into a non-empty --output (a rerun with the same settings resumes without it).")
    add_dataclass_flags(p, DataConfig, "data", rename={"source": "data"})
    add_dataclass_flags(p, TrainConfig, "train")
    p.add_argument("--resume-from-checkpoint", "--resume_from_checkpoint", nargs="?", const=True, default=None,
                   metavar="PATH", help="Continue from the last checkpoint in --output (no value) or from PATH, "
                   "as Trainer's resume_from_checkpoint; a larger --max-steps continues a finished run.")
    add_dataclass_flags(p, QuantizationFlags, "quantization")
    _quiet(p)


def _add_merge(add) -> None:
    p = add("merge", help="Merge an adapter into its pruned base, verify the zeros, export.")
    p.add_argument("--model", required=True, help="The pruned base model folder.")
    p.add_argument("--adapter", required=True, help="The adapter folder (from train).")
    _output_flags(p, "Folder for the merged model.")
    _quiet(p)


def _add_eval(add) -> None:
    p = add("eval", help="Perplexity (WikiText-2 protocol) and optional lm-eval zero-shot tasks.")
    p.add_argument("--model", required=True, help="'smollm2' or a model folder.")
    p.add_argument("--adapter", help="An adapter to load and merge first.")
    p.add_argument("--data", action="append", metavar="[NAME=]SOURCE",
                   help="Evaluation text (repeatable); default: heldout=builtin:heldout and ood=builtin:ood.")
    p.add_argument("--tasks", nargs="*", help="lm-eval tasks, or 'paper7' (needs lm-eval).")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    add_dataclass_flags(p, EvalSection, "eval", skip=("datasets", "dense", "zero_shot_tasks"),
                        rename={"zero_shot_limit": "limit"})
    _quiet(p)


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

    _add_run(add, "run", "Run every stage of a recipe (YAML).")
    _add_run(add, "demo", "The quickstart recipe on the built-in SmolLM2-135M, offline (~10 min on 2 cores).")
    add("keys", help="List every recipe key with its type, default and help.")
    _add_prune(add)
    _add_train(add)
    _add_merge(add)
    _add_eval(add)
    p = add("autoload", help="Let any tool (lm-eval, AutoPeftModel, pipeline) load SPP adapters without "
            "`import spp_peft`: a reversible start-up hook (.pth) in this environment.")
    p.add_argument("action", choices=("enable", "disable", "status"))
    p.add_argument("--target", help="Folder for the .pth file (default: this environment's site-packages).")
    p = add("inspect", help="Sparsity and metadata of a model folder, an adapter or a run folder.")
    p.add_argument("path")
    p.add_argument("--max-rows", type=int, default=20)
    # Listed for --help only: main() hands `estimate ...` to spp_peft.estimate's own parser.
    sub.add_parser("estimate", help="Estimate the memory of SPP training (spp_peft.estimate).", add_help=False)
    return parser
