"""The verified export of a merged model: safetensors with its sparsity metadata, written atomically.

A merged SPP model must hold exactly the zero set of its pruned base. :func:`verify` compares the two in
memory; :func:`export_merged` writes the merged model to a temporary folder, reads the files back, checks
them the same way (and against the mask fingerprints it records in ``config.json``) and only then renames
the folder into place. :func:`pruned_layers` and :func:`expected_pattern` read, from a pruned model, which
layers and which N:M pattern the checks are about.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from spp_peft._utils import atomic_write_dir, load_safetensors_folder, numel
from spp_peft.sparsity import (
    SparsityViolation,
    assert_same_sparsity,
    describe_mask,
    linear_weights,
    sparsity_report,
)

__all__ = [
    "SPARSITY_CONFIG_KEY",
    "expected_pattern",
    "export_merged",
    "pruned_layers",
    "sparsity_metadata",
    "verify",
]

#: Key of the sparsity metadata written into an exported model's ``config.json``.
SPARSITY_CONFIG_KEY = "spp_sparsity"


def pruned_layers(model: nn.Module) -> list[str]:
    """Names of the pruned linear layers: from the pruning metadata, else every linear layer holding zeros
    except the output head (whose zeros, if any, are a padding row of tied embeddings, not pruning)."""
    meta = getattr(model.config, "spp_pruning", None) or {}
    if meta.get("pruned_layers"):
        return list(meta["pruned_layers"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name for name, module in model.named_modules() if head is not None and module is head}
    return [layer.name for layer in sparsity_report(model, exclude_dense=True).layers if layer.name not in head_names]


def expected_pattern(model: nn.Module) -> Optional[str]:
    """The N:M pattern the pruning metadata promises (None for unstructured or unknown pruning)."""
    meta = getattr(model.config, "spp_pruning", None) or {}
    pattern = meta.get("pattern")
    return pattern if pattern and pattern != "unstructured" else None


def verify(reference: nn.Module, merged: nn.Module, layers: Optional[list[str]] = None) -> dict:
    """Check that ``merged`` has exactly the zero set of ``reference`` in every (pruned) linear layer.

    Returns ``{"ok", "layers", "message"}``; a :class:`SparsityViolation` is caught and reported, so that the
    report can show it, and the caller decides whether to stop (the pipeline does).
    """
    reference_weights = _state_of(reference, layers)
    try:
        changes = assert_same_sparsity(reference_weights, _state_of(merged, layers))
    except SparsityViolation as err:
        return {"ok": False, "layers": len(reference_weights), "message": str(err)}
    return {"ok": True, "layers": len(changes),
            "message": f"zero sets identical to the pruned base in all {len(changes)} pruned layers"}


def _state_of(model: Union[nn.Module, dict], layers: Optional[list[str]]) -> dict[str, torch.Tensor]:
    """``{name.weight: weight}`` (stored layout) of the given linear layers, for zero-set comparisons."""
    weights = linear_weights(model)
    names = layers if layers is not None else list(weights)
    return {f"{n}.weight": weights[n][0] for n in names if n in weights}


def sparsity_metadata(model: nn.Module, layers: list[str], method: str, pattern: Optional[str]) -> dict:
    """The ``spp_sparsity`` block of an exported config: totals and each pruned layer's mask record."""
    weights = linear_weights(model)
    records = {n: describe_mask(weights[n][0], weights[n][1]).to_dict() for n in layers if n in weights}
    total = sum(numel(r["shape"]) for r in records.values())
    zeros = sum(r["sparsity"] * numel(r["shape"]) for r in records.values())
    return {
        "method": method,
        "pattern": pattern,
        "total_sparsity": zeros / total if total else 0.0,
        "layers": records,
        "verified_against": "the pruned base (zero sets compared weight by weight)",
    }


def export_merged(
    model: nn.Module,
    tokenizer,
    out_dir: Union[str, os.PathLike],
    reference: nn.Module,
    layers: list[str],
    method: str,
    pattern: Optional[str] = None,
    overwrite: bool = True,
) -> Path:
    """Write a merged model as safetensors with its sparsity metadata, atomically and verified.

    The model goes to a temporary folder next to ``out_dir``; the files are read back, their zero sets
    compared with ``reference`` (the pruned base) and the recorded fingerprints checked; only then is the
    folder renamed to ``out_dir`` (replacing an older export only with ``overwrite``; see
    :func:`spp_peft._utils.atomic_write_dir`). On any failure ``out_dir`` is untouched.
    """
    meta = sparsity_metadata(model, layers, method, pattern)
    had = hasattr(model.config, SPARSITY_CONFIG_KEY)
    try:
        with atomic_write_dir(out_dir, overwrite=overwrite) as tmp:
            setattr(model.config, SPARSITY_CONFIG_KEY, meta)
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            _check_export(tmp, reference, layers)
    finally:
        if not had and hasattr(model.config, SPARSITY_CONFIG_KEY):
            delattr(model.config, SPARSITY_CONFIG_KEY)
    return Path(out_dir).expanduser()


def _check_export(folder: Path, reference: nn.Module, layers: list[str]) -> None:
    """Verify what is on disk, not what is in memory: every pruned layer saved, with the reference's zero
    set and the fingerprint recorded in ``config.json``."""
    try:
        state = load_safetensors_folder(folder)
    except FileNotFoundError:
        raise RuntimeError(f"export: no safetensors file was written to {folder}") from None
    on_disk = {n: t for n, t in state.items() if n[: -len(".weight")] in set(layers)}
    if len(on_disk) != len(layers):
        missing = sorted(set(layers) - {n[: -len(".weight")] for n in on_disk})
        raise SparsityViolation(f"export: pruned layer(s) missing from the saved files: {missing[:3]}")
    assert_same_sparsity(_state_of(reference, layers), on_disk)
    saved_config = json.loads((folder / "config.json").read_text())
    recorded = saved_config.get(SPARSITY_CONFIG_KEY, {}).get("layers", {})
    reference_weights = linear_weights(reference)
    for name, tensor in on_disk.items():
        layer = name[: -len(".weight")]
        if describe_mask(tensor).fingerprint != describe_mask(
                reference_weights[layer][0]).fingerprint or layer not in recorded:
            raise SparsityViolation(f"export: layer '{layer}' on disk does not match the recorded mask")
