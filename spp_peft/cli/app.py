"""``main``: parse the command line, set up logging, and run one subcommand inside the error boundary."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Optional, Sequence

from spp_peft.cli.commands import COMMANDS
from spp_peft.cli.errors import guarded
from spp_peft.cli.estimate import cmd_estimate
from spp_peft.cli.parser import DEBUG_FLAGS, build_parser

#: Subcommands that accept dotted recipe flags after the known ones.
DOTTED = ("run", "demo")
#: Subcommands that take other flags: ``train`` passes TrainingArguments fields through (``--report_to wandb``).
PASS_THROUGH = ("train",)


def _log_level(verbose: bool, quiet: bool) -> int:
    if verbose:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    # Neither -v nor -q: follow transformers' verbosity when the user chose one (TRANSFORMERS_VERBOSITY).
    name = os.environ.get("TRANSFORMERS_VERBOSITY", "").upper()
    return getattr(logging, name) if name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else logging.INFO


def _quiet_libraries() -> None:
    """-q quiets everything: transformers' logs and bars ("Loading weights"), datasets' bars; the Trainer's
    and our own bars follow transformers' switch (:func:`spp_peft._utils.progress.progress_enabled`)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("spp_peft").setLevel(_log_level(verbose, quiet))
    if quiet:
        _quiet_libraries()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns its exit code (see :data:`~spp_peft.cli.errors.EXIT_CODES_HELP`)."""
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
    if extra and args.command not in DOTTED + PASS_THROUGH:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging(args.verbose, getattr(args, "quiet", False))
    return guarded(args.command, lambda: COMMANDS[args.command](args, extra), debug=args.verbose)
