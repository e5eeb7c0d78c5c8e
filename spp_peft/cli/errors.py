"""The CLI's error boundary: every expected failure becomes one line on stderr and a documented exit code.

A traceback is for bugs and for ``-v`` / ``--debug``; a user who typed a bad value, pointed at a truncated
file or ran out of disk gets one line saying what failed and on which file, key or value.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

from spp_peft.errors import RecipeError, TrainingDiverged, UnreadableInput, is_read_failure, one_line

EXIT_OK = 0
EXIT_FAILED = 1  # an unexpected error: a bug, rerun with -v and report it
EXIT_BAD_INPUT = 2
EXIT_SPARSITY = 3
EXIT_IO = 4
EXIT_DIVERGED = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `cmd | head` reports for tools killed by the closed pipe

#: The exit codes as ``--help`` and the README list them.
EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    unexpected error (a bug: rerun with -v for the traceback and report it)
  2    bad input: recipe, flags, values, missing or empty files, settings the model cannot take
  3    sparsity violation: a zero of the pruned base would be (or was) lost
  4    I/O error: disk full, permission denied, unreadable or truncated file (safetensors, JSON, text)
  5    training diverged: non-finite adapter weights (nothing was saved)
  130  interrupted (Ctrl-C)
  141  output closed early (e.g. `spp-peft keys | head -1`); nothing is printed
Errors are one line on stderr; -v / --debug adds the traceback."""

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def classify(err: BaseException) -> tuple[int, str]:
    """``(exit code, one-line message)`` for an exception raised by a command."""
    from spp_peft.sparsity import SparsityViolation

    if _no_space(err):
        name = f": {err.filename}" if getattr(err, "filename", None) else ""
        return EXIT_IO, f"error: no space left on device{name}; free space and rerun"
    if isinstance(err, SparsityViolation):
        return EXIT_SPARSITY, f"SPARSITY VIOLATION: {err}"
    if isinstance(err, TrainingDiverged):
        return EXIT_DIVERGED, f"error: {err}"
    if isinstance(err, RecipeError):
        return EXIT_BAD_INPUT, f"error: {err}"
    if isinstance(err, OSError):
        return _classify_os_error(err)
    if is_read_failure(err):
        return EXIT_IO, f"error: unreadable input: {err}"
    if isinstance(err, (ValueError, TypeError)) and _raised_by_spp_peft(err):
        # The library signals invalid arguments with these; elsewhere they are bugs.
        return EXIT_BAD_INPUT, f"error: {err}"
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return EXIT_IO, f"error: out of memory: {err}"
    return EXIT_FAILED, f"unexpected error: {type(err).__name__}: {err} (rerun with -v for the traceback)"


def _no_space(err: BaseException) -> bool:
    # safetensors' Rust writer reports ENOSPC only in its message ("... (os error 28)").
    return getattr(err, "errno", None) in _NO_SPACE or f"(os error {errno.ENOSPC})" in str(err)


def _classify_os_error(err: OSError) -> tuple[int, str]:
    name = f": {err.filename}" if err.filename else ""
    if isinstance(err, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return EXIT_BAD_INPUT, f"error: {err}"
    if isinstance(err, UnreadableInput) or err.errno is None:
        return EXIT_IO, f"error: {err}"
    return EXIT_IO, f"error: {err.strerror or err}{name}"


def _raised_by_spp_peft(err: BaseException) -> bool:
    """Whether the innermost frame that raised ``err`` is spp_peft's own code (a deliberate refusal)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # spp_peft/, above cli/
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(package + os.sep)


def _silence_stdout() -> None:
    # Python's advice for SIGPIPE: point stdout at devnull so the interpreter's final flush cannot fail.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout without a file descriptor (captured)
        pass


def guarded(command: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run ``body`` and turn what it raises into one stderr line and an exit code (see EXIT_CODES_HELP)."""
    try:
        code = body()
        sys.stdout.flush()  # a closed pipe shows up here, inside the boundary, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _report(command, "interrupted", debug)
        return EXIT_INTERRUPTED
    except Exception as err:
        code, message = classify(err)
        _report(command, message, debug)
        return code


def _report(command: str, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    try:
        print(f"spp-peft {command}: {one_line(message)}", file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):  # stderr gone too: nothing left to tell
        pass
