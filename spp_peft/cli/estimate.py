"""``spp-peft estimate ...``: handed whole to :mod:`spp_peft.estimate`, which owns its options and its work."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from spp_peft.cli.errors import EXIT_BAD_INPUT


def cmd_estimate(argv: Sequence[str]) -> int:
    """Parse ``argv`` with the estimate's own arguments and run it (imported here, lazily, so the rest of
    the CLI works without it)."""
    try:
        from spp_peft import estimate
    except ImportError as err:
        print(f"spp-peft estimate: error: the memory estimate is not available in this installation: {err}",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog="spp-peft estimate", description="Estimate the memory of SPP training.")
    estimate.add_estimate_arguments(parser)
    return int(estimate.run_estimate(parser.parse_args(list(argv))) or 0)
