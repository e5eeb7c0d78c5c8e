"""Error types and bounded quoting shared by the recipe, the pipeline and the CLI (imports nothing of
spp_peft, so every floor can use it).

Messages quote user values with :func:`quote`, never with a bare ``repr``: a 300-byte YAML recipe can hold
a value whose full ``repr`` is tens of megabytes (aliases nest lists by reference, "billion laughs").
"""

from __future__ import annotations

import json
import os
import reprlib
from contextlib import contextmanager
from typing import Iterator, Union

#: The longest a quoted value may be in a message (characters).
QUOTE_LIMIT = 200
#: The longest a whole one-line error message may be (characters).
MESSAGE_LIMIT = 2000

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict = 3, 6, 6, 6
_repr.maxstring, _repr.maxother, _repr.maxlong = QUOTE_LIMIT, QUOTE_LIMIT, 40


def quote(value) -> str:
    """``repr(value)`` for a message, at most :data:`QUOTE_LIMIT` characters however large ``value`` is."""
    text = _repr.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` on one line (whitespace runs collapsed), cut to ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class RecipeError(ValueError):
    """A recipe, a command-line flag or a value that cannot be run; the message names the key and the fix."""


class UnreadableInput(OSError):
    """A file that exists but cannot be read as what it should be (truncated safetensors, broken JSON,
    bytes that are not UTF-8); the message names the file."""


class TrainingDiverged(RuntimeError):
    """Training produced non-finite adapter weights; they were not saved."""


class CheckpointMismatch(FileExistsError):
    """A training output folder holds checkpoints this run would not continue (a run of other settings, or
    resuming is off) and ``overwrite`` was not given: nothing was deleted."""


def describe_cause(err: BaseException) -> str:
    """A short, one-line account of why reading failed (the exception's own text, bounded)."""
    if isinstance(err, UnicodeDecodeError):
        return f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start})"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
    return one_line(f"{type(err).__name__}: {err}", 400)


def is_read_failure(err: BaseException) -> bool:
    """Whether ``err`` says a file's content is unreadable (not a missing file, not a bug of ours)."""
    if isinstance(err, (UnicodeDecodeError, json.JSONDecodeError, UnreadableInput)):
        return True
    # safetensors' Rust error type and transformers' "not a valid JSON file" OSError.
    return type(err).__name__ == "SafetensorError" or (
        isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.errno is None)


@contextmanager
def reading(path: Union[str, os.PathLike], what: str = "") -> Iterator[None]:
    """Turn a failure to read ``path`` into :class:`UnreadableInput` naming the file (and ``what`` it is)."""
    try:
        yield
    except UnreadableInput:
        raise
    except Exception as err:
        if not is_read_failure(err):
            raise
        label = f"{what} {os.fspath(path)}" if what else os.fspath(path)
        raise UnreadableInput(f"cannot read {label}: {describe_cause(err)}") from err
