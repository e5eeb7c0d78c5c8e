"""Shared pieces of the pruners: weight access in ``(out, in)`` layout and deterministic mask selection.

Every pruner scores the weights of a layer and zeroes the lowest scores within *comparison groups*: a whole
layer, an output row (Wanda, Sun et al. 2023), or a block of M consecutive inputs of a row (N:M sparsity,
Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"). Selection uses a *stable* sort so that
ties (frequent in weights dequantized from 4-bit blocks, such as SmolLM2's GGUF) are broken by position
and the same model always gives the same mask.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from spp_peft.sparsity import is_fan_in_fan_out, parse_nm

UNSTRUCTURED = "unstructured"
MAX_UNSTRUCTURED_SPARSITY = 0.95


def read_weight(layer: nn.Module, device: Optional[torch.device] = None) -> torch.Tensor:
    """A float32 copy of ``layer.weight`` in ``(out, in)`` layout (transposing ``Conv1D``)."""
    weight = layer.weight.detach()
    if is_fan_in_fan_out(layer):
        weight = weight.T
    return weight.to(device=device or weight.device, dtype=torch.float32, copy=True).contiguous()


def write_weight(layer: nn.Module, weight_out_in: torch.Tensor) -> None:
    """Write an ``(out, in)`` weight back into ``layer`` in its own layout, dtype and device."""
    target = layer.weight
    new = weight_out_in.T if is_fan_in_fan_out(layer) else weight_out_in
    if tuple(new.shape) != tuple(target.shape):
        raise ValueError(f"write_weight: shape {tuple(new.shape)} does not fit weight {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(new.to(device=target.device, dtype=target.dtype))


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """``None`` for ``"unstructured"``, ``(n, m)`` for an N:M pattern such as ``"2:4"``."""
    if pattern == UNSTRUCTURED:
        return None
    if not isinstance(pattern, str) or ":" not in pattern:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    return parse_nm(pattern)


def num_to_prune(total: int, sparsity: float) -> int:
    """How many of ``total`` weights to zero at ``sparsity``: ``floor(total * sparsity)``.

    A tiny tolerance absorbs binary rounding (``0.29 * 100 == 28.999999999999996`` must give 29).
    """
    return int(math.floor(total * sparsity + 1e-9))


def lowest_k_mask(score: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Bool mask, True at the ``k`` lowest scores along ``dim``; ties go to the lower index (stable sort)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k <= 0:
        return mask
    order = torch.sort(score, dim=dim, stable=True).indices.narrow(dim, 0, k)
    return mask.scatter_(dim, order, True)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Prune mask of an ``(out, in)`` score: the lowest ``sparsity`` fraction of each row, or of the layer."""
    if per_row:
        return lowest_k_mask(score, num_to_prune(score.shape[1], sparsity), dim=1)
    flat = lowest_k_mask(score.reshape(-1), num_to_prune(score.numel(), sparsity), dim=0)
    return flat.reshape(score.shape)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune mask with the ``n`` lowest scores of every block of ``m`` consecutive inputs of each row."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M mask: in_features={cols} is not divisible by M={m}")
    return lowest_k_mask(score.reshape(rows, cols // m, m), n, dim=-1).reshape(rows, cols)
