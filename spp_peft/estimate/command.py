"""``spp-peft estimate`` and ``python -m spp_peft.estimate``: flags generated from :class:`EstimateSettings`."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import fields, replace
from typing import Any, Callable, Optional, Sequence

from .components import estimate_memory
from .result import format_estimate
from .settings import METHODS, EstimateSettings
from .shape import model_shape

__all__ = ["add_estimate_arguments", "settings_from_args", "run_estimate", "main"]


def _flag_type(hint: Any) -> Callable[[str], Any]:
    """How a flag's text becomes the field's value: ``int`` and ``float`` (also when optional) as such,
    anything else (names, dtypes, paths) as text for the settings to check."""
    if hint in (int, float):
        return hint
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args in ([int], [float]) else str


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`EstimateSettings` field (``--batch-size`` for ``batch_size``; a bare flag for
    a boolean), plus ``--json``. ``--method`` also takes ``all`` (its default): the three methods side by
    side."""
    hints = typing.get_type_hints(EstimateSettings)
    for spec in fields(EstimateSettings):
        meta, flag = spec.metadata, "--" + spec.name.replace("_", "-")
        if hints[spec.name] is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        parser.add_argument(flag, type=meta.get("parse", _flag_type(hints[spec.name])),
                            default=meta.get("cli_default", spec.default),
                            choices=meta.get("cli_choices", meta.get("choices")), help=meta["help"])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def settings_from_args(args: argparse.Namespace) -> list[EstimateSettings]:
    """One :class:`EstimateSettings` per method asked for (three for ``--method all``).

    Raises:
        ValueError: a value the settings refuse.
    """
    values = {spec.name: getattr(args, spec.name) for spec in fields(EstimateSettings)}
    methods = METHODS if values["method"] == "all" else (values["method"],)
    if values["method"] == "all" and values["quantization"] != "none":
        methods = tuple(m for m in methods if m != "full")  # a quantized base is frozen: adapters only
    return [EstimateSettings(**{**values, "method": method}) for method in methods]


def run_estimate(args: argparse.Namespace) -> int:
    """Run the ``estimate`` command from parsed arguments; prints the result, returns the exit status (2 for
    invalid input, with a one-line message on stderr)."""
    try:
        settings = settings_from_args(args)
        shape = model_shape(settings[0].model)  # read once for all methods
        rows = [estimate_memory(replace(one, model=shape)) for one in settings]
    except ValueError as err:
        print(f"spp-peft estimate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([e.to_dict() for e in rows], indent=1))
    else:
        print(format_estimate(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spp_peft.estimate",
                                     description="Per-device memory estimate for SPP, LoRA and full fine-tuning.")
    add_estimate_arguments(parser)
    return run_estimate(parser.parse_args(argv))
