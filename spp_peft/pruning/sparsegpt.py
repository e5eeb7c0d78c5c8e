"""SparseGPT: one-shot pruning with optimal-brain-surgeon weight updates.

Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
arXiv:2301.00774 (Algorithm 1). For a layer ``Y = W X`` the reconstruction error ``||W X - W' X||^2`` is
a quadratic in each row of ``W'`` with Hessian ``H = 2 X X^T``. The columns are processed left to right in
blocks; the prune mask of a block is chosen from the OBS saliency ``w^2 / [H^-1]_jj^2`` (for N:M patterns,
per group of M columns, chosen when the group is reached), and the error of every pruned (and kept) column
is propagated to the columns on its right with the rows of the upper Cholesky factor of ``H^-1``, first
lazily inside the block and then to the remaining columns in one matrix product.
"""

from __future__ import annotations

from typing import Optional

import torch

from spp_peft.pruning.common import lowest_k_mask, num_to_prune


class HessianStats:
    """Running ``X^T X`` of a layer's inputs in float32; :meth:`hessian` gives ``H = 2/n * sum x x^T``."""

    def __init__(self, in_features: int, device: Optional[torch.device] = None):
        self.in_features = in_features
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate a batch of layer inputs of shape ``(..., in_features)``."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).to(device=self.xtx.device, dtype=torch.float32)
        if x.shape[1] != self.in_features:
            raise ValueError(f"HessianStats: expected {self.in_features} input features, got {x.shape[1]}")
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise RuntimeError("HessianStats: no calibration input reached this layer")
        return self.xtx * (2.0 / self.tokens)


def _upper_cholesky_of_inverse(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """``U`` with ``U^T U = (H + lambda I)^-1``, ``lambda = percdamp * mean(diag H)``."""
    h = hessian.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise RuntimeError(
            f"SparseGPT: the damped Hessian is not positive definite (Cholesky failed at column {int(info)}); "
            f"increase percdamp (now {percdamp}) or use more calibration data"
        )
    inverse = torch.cholesky_inverse(lower)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if int(info) != 0:
        raise RuntimeError(f"SparseGPT: Cholesky of H^-1 failed; increase percdamp (now {percdamp})")
    return upper


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: Optional[tuple[int, int]] = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune an ``(out, in)`` weight with SparseGPT and return ``(new weight, prune mask)``.

    Args:
        weight: ``(out, in)`` weight (not modified).
        hessian: ``(in, in)`` Hessian ``2/n X X^T`` of the layer inputs (:class:`HessianStats`).
        sparsity: unstructured fraction to prune; the count per block of columns is allocated so that
            the layer total is exactly ``floor(out * in * sparsity)``. Ignored for N:M.
        nm: ``(n, m)`` to prune ``n`` of every ``m`` consecutive inputs of each row, ``None`` for unstructured.
        blocksize: columns per lazy-update block (128 in the paper); a multiple of ``m`` for N:M.
        percdamp: dampening, as a fraction of the mean diagonal of ``H``.

    Returns:
        the pruned weight (float32, with the OBS update of the kept weights) and the bool prune mask.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"sparsegpt_prune: Hessian {tuple(hessian.shape)} does not fit weight {(rows, cols)}")
    if blocksize <= 0:
        raise ValueError(f"sparsegpt_prune: blocksize must be positive, got {blocksize}")
    if nm is not None and blocksize % nm[1]:
        raise ValueError(f"sparsegpt_prune: blocksize={blocksize} must be a multiple of M={nm[1]} for N:M")
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()

    # Inputs that were never active carry no information: their weights cannot matter to the output, so
    # they are zeroed (and pruned first, their saliency being 0); a unit diagonal keeps H invertible.
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _upper_cholesky_of_inverse(h, percdamp)

    mask = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = hinv1.diagonal()
        if nm is None:
            # The block's share of the layer total, so that the per-block counts sum exactly to the target.
            k = num_to_prune(rows * i2, sparsity) - num_to_prune(rows * i1, sparsity)
            saliency = w1.pow(2) / d.pow(2).reshape(1, -1)
            mask1 = lowest_k_mask(saliency.reshape(-1), k, dim=0).reshape(w1.shape)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                # Chosen only now, from weights already updated by the columns on the left.
                saliency = w1[:, i : i + m].pow(2) / d[i : i + m].pow(2).reshape(1, -1)
                mask1[:, i : i + m] = lowest_k_mask(saliency, n, dim=1)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            err = (col - q) / d[i]
            # OBS update of the columns right of i inside the block.
            w1[:, i:].sub_(err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0))
            err1[:, i] = err
        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        # Lazy batch update of every column right of the block.
        w[:, i2:].sub_(err1 @ hinv[i1:i2, i2:])
    return w, mask
