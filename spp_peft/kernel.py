"""The SPP linear map as one autograd Function: the maths of forward and backward, nothing else.

SPP (Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models",
ICML 2024, arXiv:2405.16057) adapts a frozen, pruned weight ``W`` (``m`` outputs x ``n`` inputs) by a
multiplicative factor built from a per-row vector ``B`` (``m``) and a per-group matrix ``A`` (``r x n``):

    W' = W * (1 + D),    D[j, k] = sum over adapters a of  s_a * B_a[j] * A_a[g(j), k]

where ``g(j)`` is the contiguous row group of output ``j`` (:func:`group_index`). Since ``W'`` is ``W``
times something, every zero of ``W`` is a zero of ``W'``.

Cost. Autograd through the materialised formula keeps ``D``, ``W * D`` and ``W'`` alive until backward
(3 weight-sized tensors per layer). :class:`SPPLinearFunction` saves only the input ``x`` and rebuilds
``W'`` in backward, so a training step costs three weight-sized matmuls (forward, grad of the input, and
``G = grad_y^T x``), the same as full fine-tuning, plus elementwise passes; the parameter gradients are
reductions of ``G * W`` over each row (``grad_B``) and each row group (``grad_A``). ``chunk_rows`` bounds
the weight-sized temporaries further by processing the output rows in blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def group_index(out_features: int, r: int, device=None) -> torch.Tensor:
    """The row group of each output row: ``g(j) = floor(j * r / m)``.

    This is the one definition of SPP's grouping. It splits the ``m`` rows into ``r`` contiguous groups
    whose sizes differ by at most one; when ``r`` divides ``m`` every group has ``m / r`` rows, exactly as
    in the reference implementation (``r = 16`` groups of ``m / 16`` consecutive rows).
    """
    if not 1 <= r <= out_features:
        raise ValueError(f"SPP needs 1 <= r <= out_features, got r={r} for out_features={out_features}")
    return torch.div(torch.arange(out_features, device=device) * r, out_features, rounding_mode="floor")


@dataclass(frozen=True)
class AdapterFactors:
    """The trainable factors of one active SPP adapter on one layer: ``A`` (r, n), ``B`` (m,) and scale s."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


def _even_groups(out_features: int, r: int) -> bool:
    return out_features % r == 0


def delta_factor(
    factors: Sequence[AdapterFactors],
    out_features: int,
    dtype: torch.dtype,
    rows: Optional[slice] = None,
) -> torch.Tensor:
    """``D`` (the factor minus one) for the rows ``rows`` of the layer, summed over ``factors``, in ``dtype``.

    This is the one definition of the SPP factor: the kernel, the merge and the tests all build it here.
    """
    rows = rows or slice(0, out_features)
    start, stop = rows.start, rows.stop
    result: Optional[torch.Tensor] = None
    for f in factors:
        A = f.A.to(dtype)
        B = f.B.to(dtype)[start:stop] * f.scale
        r, n = A.shape
        if _even_groups(out_features, r):
            size = out_features // r
            # Row blocks are aligned to whole groups by the caller (see _row_blocks), so a broadcast over a
            # (groups, rows per group, n) view builds D without an index_select temporary.
            g0, g1 = start // size, stop // size
            term = (B.view(g1 - g0, size, 1) * A[g0:g1].unsqueeze(1)).view(stop - start, n)
        else:
            term = A.index_select(0, group_index(out_features, r, A.device)[start:stop]).mul_(B.unsqueeze(1))
        result = term if result is None else result.add_(term)
    assert result is not None, "delta_factor needs at least one adapter"
    return result


def effective_weight(
    weight_out_in: torch.Tensor,
    factors: Sequence[AdapterFactors],
    include_base: bool = True,
    rows: Optional[slice] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``W * (1 + D)`` (or only ``W * D`` when ``include_base=False``) for ``rows`` of an (out, in) weight.

    Computed as ``W + W * D`` in ``dtype`` (default: the weight's), never as ``W * (1 + D)``: in bf16
    ``1 + D`` would round away a small ``D`` entirely, while ``W * D`` keeps its full relative precision.
    Returns a new tensor; ``weight_out_in`` is never written.
    """
    dtype = dtype or weight_out_in.dtype
    m = weight_out_in.shape[0]
    rows = rows or slice(0, m)
    w = weight_out_in[rows].to(dtype)
    out = delta_factor(factors, m, dtype, rows).mul_(w)
    return out.add_(w) if include_base else out


def _row_blocks(out_features: int, factors: Sequence[AdapterFactors], chunk_rows: Optional[int]) -> list[slice]:
    """Split the output rows into blocks of about ``chunk_rows``, aligned to whole groups of every adapter
    whose groups are even (so :func:`delta_factor` can use its broadcast path)."""
    if not chunk_rows or chunk_rows >= out_features:
        return [slice(0, out_features)]
    align = 1
    for f in factors:
        r = f.A.shape[0]
        if _even_groups(out_features, r):
            size = out_features // r
            align = align * size // torch.gcd(torch.tensor(align), torch.tensor(size)).item()
    step = max(align, (chunk_rows // align) * align)
    return [slice(i, min(i + step, out_features)) for i in range(0, out_features, step)]


def _accumulate_factor_grads(
    gw: torch.Tensor,
    factors: Sequence[AdapterFactors],
    out_features: int,
    rows: slice,
    grads_A: list,
    grads_B: list,
) -> None:
    """Add the gradients of ``A`` and ``B`` from ``gw = dL/dD`` (= ``G * W``) of the rows ``rows``.

    ``dL/dB[j] = s * sum_k gw[j, k] A[g(j), k]`` and ``dL/dA[g, k] = s * sum_{j in g} gw[j, k] B[j]``.
    """
    start, stop = rows.start, rows.stop
    n = gw.shape[1]
    for i, f in enumerate(factors):
        need_A, need_B = grads_A[i] is not None, grads_B[i] is not None
        if not (need_A or need_B):
            continue
        A = f.A.to(gw.dtype)
        B = f.B.to(gw.dtype)[start:stop]
        r = A.shape[0]
        if _even_groups(out_features, r):
            size = out_features // r
            g0, g1 = start // size, stop // size
            gw3 = gw.view(g1 - g0, size, n)
            if need_B:  # (groups, size, n) @ (groups, n, 1)
                grads_B[i][start:stop] += torch.bmm(gw3, A[g0:g1].unsqueeze(2)).view(-1).mul_(f.scale)
            if need_A:  # (groups, 1, size) @ (groups, size, n)
                grads_A[i][g0:g1] += torch.bmm(B.view(g1 - g0, 1, size), gw3).squeeze(1).mul_(f.scale)
        else:
            groups = group_index(out_features, r, gw.device)[start:stop]
            if need_B:  # (rows, n) @ (n, r), then each row's own group: cheap next to the main matmuls
                grads_B[i][start:stop] += (gw @ A.T).gather(1, groups.unsqueeze(1)).squeeze(1).mul_(f.scale)
            if need_A:  # (r, rows) one-hot scaled by B, @ (rows, n)
                onehot = torch.zeros(r, stop - start, dtype=gw.dtype, device=gw.device)
                onehot[groups, torch.arange(stop - start, device=gw.device)] = B
                grads_A[i] += (onehot @ gw).mul_(f.scale)


class SPPLinearFunction(torch.autograd.Function):
    """``y = x @ W'^T + bias`` with ``W' = W * (1 + D)`` (or ``y = x @ (W * D)^T`` when ``include_base`` is
    False, the adapter branch used with dropout), saving only ``x`` for backward.

    Inputs after the fixed arguments are the flattened ``A_1, B_1, A_2, B_2, ...`` of the active adapters,
    so autograd sees them as leaves. ``weight`` is frozen (no gradient is computed for it); ``bias`` gets its
    gradient when it requires one.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, include_base, scales, chunk_rows, *tensors):
        factors = [AdapterFactors(tensors[2 * i], tensors[2 * i + 1], s) for i, s in enumerate(scales)]
        w = weight.T if fan_in_fan_out else weight
        m = w.shape[0]
        blocks = _row_blocks(m, factors, chunk_rows)
        if len(blocks) == 1:
            y = F.linear(x, effective_weight(w, factors, include_base, dtype=x.dtype), bias)
        else:
            y = x.new_empty(*x.shape[:-1], m)
            for rows in blocks:
                y[..., rows] = F.linear(x, effective_weight(w, factors, include_base, rows, dtype=x.dtype))
            if bias is not None:
                y += bias
        ctx.save_for_backward(x, weight, *tensors)
        ctx.fan_in_fan_out, ctx.include_base, ctx.scales, ctx.chunk_rows = (
            fan_in_fan_out,
            include_base,
            scales,
            chunk_rows,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, *tensors = ctx.saved_tensors
        factors = [AdapterFactors(tensors[2 * i], tensors[2 * i + 1], s) for i, s in enumerate(ctx.scales)]
        w = weight.T if ctx.fan_in_fan_out else weight
        m, n = w.shape
        need_x = ctx.needs_input_grad[0]
        grads_A = [torch.zeros_like(f.A, dtype=x.dtype) if ctx.needs_input_grad[7 + 2 * i] else None
                   for i, f in enumerate(factors)]
        grads_B = [torch.zeros_like(f.B, dtype=x.dtype) if ctx.needs_input_grad[8 + 2 * i] else None
                   for i, f in enumerate(factors)]
        need_factors = any(g is not None for g in grads_A + grads_B)

        x2 = x.reshape(-1, n)
        gy2 = grad_y.reshape(-1, m).to(x.dtype)
        grad_x = torch.zeros_like(x2) if need_x else None
        for rows in _row_blocks(m, factors, ctx.chunk_rows):
            gy_rows = gy2[:, rows]
            if need_x:
                grad_x.addmm_(gy_rows, effective_weight(w, factors, ctx.include_base, rows, dtype=x.dtype))
            if need_factors:
                # dL/dD = (grad_y^T x) * W: the one weight-sized contraction over tokens serves both factors.
                gw = (gy_rows.T @ x2).mul_(w[rows])
                _accumulate_factor_grads(gw, factors, m, rows, grads_A, grads_B)
                del gw

        grad_factors = []
        for f, gA, gB in zip(factors, grads_A, grads_B):
            grad_factors += [gA.to(f.A.dtype) if gA is not None else None,
                             gB.to(f.B.dtype) if gB is not None else None]
        grad_x = grad_x.view_as(x) if grad_x is not None else None
        # A trainable bias (SPPConfig.bias = "all" / "spp_only") gets the usual gradient; W stays frozen.
        grad_bias = grad_y.reshape(-1, m).sum(0) if ctx.needs_input_grad[2] else None
        return (grad_x, None, grad_bias, None, None, None, None, *grad_factors)


def spp_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    factors: Sequence[AdapterFactors],
    fan_in_fan_out: bool = False,
    include_base: bool = True,
    chunk_rows: Optional[int] = None,
) -> torch.Tensor:
    """Apply the SPP linear map (see :class:`SPPLinearFunction`) in ``x``'s dtype.

    Args:
        x: input ``(..., n)``.
        weight: the frozen base weight, ``(m, n)`` or ``(n, m)`` when ``fan_in_fan_out``.
        bias: the frozen base bias or ``None`` (ignored when ``include_base`` is False).
        factors: the active adapters' ``A``, ``B`` and scale.
        fan_in_fan_out: the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``).
        include_base: compute ``x @ W'^T + bias``; if False only the adapter branch ``x @ (W * D)^T``.
        chunk_rows: process the output rows in blocks of about this many rows, bounding every
            weight-sized temporary to one block (slower: more, smaller matmuls). ``None`` = one block.
    """
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if (bias is not None and include_base) else None
    flat = []
    for f in factors:
        flat += [f.A, f.B]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t.requires_grad for t in flat)):
        # Inference: nothing to save, one effective weight, one matmul.
        w = weight.T if fan_in_fan_out else weight
        return F.linear(x, effective_weight(w, factors, include_base, dtype=x.dtype), bias)
    scales = tuple(float(f.scale) for f in factors)
    return SPPLinearFunction.apply(x, weight, bias, fan_in_fan_out, include_base, scales, chunk_rows, *flat)
