"""Magnitude pruning: zero the weights of smallest absolute value.

The classic baseline (Han et al., 2015, "Learning both Weights and Connections for Efficient Neural
Networks"), as used for LLMs in the Wanda and SparseGPT papers. No calibration data: the score is ``|W|``,
compared over the whole layer (``comparison="layer"``) or within each output row (``"row"``); for N:M
patterns within each block of M consecutive inputs of a row.
"""

from __future__ import annotations

from typing import Optional

import torch

from spp_peft.pruning.common import nm_mask, unstructured_mask

COMPARISONS = ("row", "layer")


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None, comparison: str = "row"
) -> torch.Tensor:
    """Bool prune mask (True = zero it) of an ``(out, in)`` weight by magnitude.

    Args:
        weight: the ``(out, in)`` weight.
        sparsity: fraction to prune (unstructured only; N:M prunes ``n/m``).
        nm: ``(n, m)`` for an N:M pattern, ``None`` for unstructured.
        comparison: ``"row"`` ranks weights within each output row, ``"layer"`` across the whole layer.
    """
    if comparison not in COMPARISONS:
        raise ValueError(f"magnitude comparison must be one of {COMPARISONS}, got {comparison!r}")
    score = weight.abs().float()
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, per_row=comparison == "row")


def prune_magnitude(
    weight: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None, comparison: str = "row"
) -> torch.Tensor:
    """The ``(out, in)`` weight with its lowest-magnitude entries set to zero (a new tensor)."""
    mask = magnitude_mask(weight, sparsity, nm, comparison)
    return weight.masked_fill(mask, 0)
