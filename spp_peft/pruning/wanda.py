"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter, 2023, arXiv:2306.11695).

The score of weight ``W_ij`` is ``|W_ij| * ||X_j||_2``, where ``X_j`` is the j-th input feature over all
calibration tokens. Weights are compared within each output row (the paper's key finding: per-output
comparison beats per-layer for LLMs); for N:M patterns within each block of M consecutive inputs of a row.
No weight update.
"""

from __future__ import annotations

from typing import Optional

import torch

from spp_peft.pruning.common import nm_mask, unstructured_mask


class InputNormStats:
    """Running sum of squared inputs per input feature, in float32.

    ``sqrt(sum_sq)`` is ``||X_j||_2`` over all tokens seen. (Wanda's reference code keeps the mean over
    samples instead; a per-layer constant factor changes no per-row ranking.)
    """

    def __init__(self, in_features: int, device: Optional[torch.device] = None):
        self.in_features = in_features
        self.sum_sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs of shape ``(..., in_features)``."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise ValueError(f"InputNormStats: expected {self.in_features} input features, got {x.shape[1]}")
        self.sum_sq += x.pow(2).sum(dim=0).to(self.sum_sq.device)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature."""
        return self.sum_sq.sqrt()


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` for an ``(out, in)`` weight and per-input norms ``(in,)``."""
    if input_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"wanda_scores: {tuple(input_norms.shape)} input norms for a weight of shape {tuple(weight.shape)}"
        )
    return weight.abs().float() * input_norms.to(weight.device).float().reshape(1, -1)


def wanda_mask(
    weight: torch.Tensor, input_norms: torch.Tensor, sparsity: float, nm: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """Bool prune mask (True = zero it) of an ``(out, in)`` weight by the Wanda score, per output row."""
    score = wanda_scores(weight, input_norms)
    if nm is not None:
        return nm_mask(score, *nm)
    return unstructured_mask(score, sparsity, per_row=True)


def prune_wanda(
    weight: torch.Tensor, stats: InputNormStats, sparsity: float, nm: Optional[tuple[int, int]] = None
) -> torch.Tensor:
    """The ``(out, in)`` weight with its lowest-Wanda-score entries zeroed (a new tensor)."""
    if stats.tokens == 0:
        raise RuntimeError("prune_wanda: no calibration input reached this layer")
    return weight.masked_fill(wanda_mask(weight, stats.norms, sparsity, nm), 0)
