"""Where the pruning metadata lives (``model.config.spp_pruning``) and how a pruned model is saved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

from torch import nn

from spp_peft._utils import atomic_write_dir
from spp_peft.pruning.result import PruningResult

#: Key of the pruning metadata in ``model.config``.
CONFIG_KEY = "spp_pruning"


def pruning_metadata(model: nn.Module) -> Optional[dict]:
    """The pruning metadata stored by :func:`save_pruned` / :func:`attach_metadata`, or ``None``."""
    value = getattr(model.config, CONFIG_KEY, None)
    return dict(value) if value else None


def attach_metadata(model: nn.Module, result: PruningResult) -> dict:
    """Store ``result.metadata()`` in ``model.config.spp_pruning`` and return it."""
    meta = result.metadata()
    setattr(model.config, CONFIG_KEY, meta)
    return meta


def save_pruned(
    model: nn.Module,
    tokenizer,
    out_dir: Union[str, os.PathLike],
    result: Optional[PruningResult],
    overwrite: bool = False,
) -> Path:
    """Save a pruned model (safetensors) and tokenizer with its pruning metadata, atomically.

    The files are written to a temporary folder next to ``out_dir`` and renamed into place
    (:func:`spp_peft._utils.atomic_write_dir`), so ``out_dir`` is either the old folder or the complete new
    one, never half-written; of two concurrent saves without ``overwrite`` exactly one succeeds.

    Args:
        model: the pruned model.
        tokenizer: its tokenizer (``None`` to skip).
        out_dir: destination folder.
        result: the :class:`PruningResult` of the pruning run; its metadata goes to ``config.spp_pruning``
            (``None``: a model pruned elsewhere, saved with the metadata it already has).
        overwrite: replace an existing non-empty ``out_dir`` (otherwise :class:`~spp_peft._utils.OutputExistsError`).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if result is not None:
        attach_metadata(model, result)
    with atomic_write_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir).expanduser()
