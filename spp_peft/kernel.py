"""The SPP linear map as one autograd Function: the maths of forward and backward, nothing else.

SPP (Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models",
ICML 2024, arXiv:2405.16057) adapts a frozen, pruned weight ``W`` (``m`` outputs x ``n`` inputs) by a
multiplicative factor built from a per-row vector ``B`` (``m``) and a per-group matrix ``A`` (``r x n``):

    W' = W * (1 + D),    D[j, k] = sum over adapters a of  s_a * B_a[j] * A_a[g(j), k]

where ``g(j)`` is the contiguous row group of output ``j`` (:func:`group_index`). Since ``W'`` is ``W``
times something, every zero of ``W`` is a zero of ``W'``.

Cost. Autograd through the materialised formula keeps ``D``, ``W * D`` and ``W'`` alive until backward
(3 weight-sized tensors per layer). :class:`SPPLinearFunction` saves only the input ``x`` (and references
to the frozen weight and the factors, which exist anyway) and rebuilds ``W'`` in backward, so a training
step costs three weight-sized matmuls (forward, grad of the input, and ``G = grad_y^T x``), the same as
full fine-tuning, plus a few memory-bound passes:

* building ``W'``: two passes (write ``D`` from the tiny factors, then ``W' = addcmul(W, W, D)`` in place);
  done once in forward and once in backward;
* the factor gradients: ``G`` is written into the same buffer as ``W'`` (``mm(..., out=)``), multiplied
  by ``W`` in place, and reduced per row (``grad_B``) and per row group (``grad_A``) by batched
  matrix-vector products.

So at most one weight-sized temporary exists at any time, in forward and in backward; ``chunk_rows``
bounds it further to a block of rows. Groups are handled as *runs* of consecutive groups with the same
number of rows (one run when ``r`` divides ``m``), viewed as ``(groups, rows per group, n)``, so no
``index_select`` of ``A`` (which would be weight-sized) is ever made, for even and uneven groups alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def scaling(alpha: float, r: int) -> float:
    """The scale of the factors, ``s = alpha / r`` (the paper's r = 16, alpha = 32 give s = 2)."""
    return alpha / r


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


@functools.lru_cache(maxsize=4096)
def _group_runs(out_features: int, r: int, start: int, stop: int) -> tuple[tuple[int, int, int, int], ...]:
    """The rows ``[start, stop)`` as runs ``(row0, g0, groups, size)``: ``groups`` consecutive groups
    ``g0, g0+1, ...`` each with exactly ``size`` rows inside ``[start, stop)``, starting at ``row0``.

    Derived from :func:`group_index` (group ``g`` is rows ``ceil(g*m/r) .. ceil((g+1)*m/r) - 1``). When ``r``
    divides ``m`` and the rows are whole groups there is one run; uneven groups (sizes ``q`` and ``q+1``)
    or a block boundary inside a group give a few more. Cached: the layer shapes of a model are few.
    """
    if not 1 <= r <= out_features:
        raise ValueError(f"SPP needs 1 <= r <= out_features, got r={r} for out_features={out_features}")
    runs: list[list[int]] = []
    g = start * r // out_features  # group of the first row
    while g < r:
        lo = max(-(-g * out_features // r), start)
        hi = min(-(-(g + 1) * out_features // r), stop)
        if lo >= stop:
            break
        size = hi - lo
        if runs and runs[-1][3] == size and runs[-1][0] + runs[-1][2] * size == lo:
            runs[-1][2] += 1
        else:
            runs.append([lo, g, 1, size])
        g += 1
    return tuple(tuple(run) for run in runs)


def _write_delta(out: torch.Tensor, factors: Sequence[AdapterFactors], out_features: int, rows: slice) -> None:
    """Write ``D`` of the rows ``rows`` into ``out`` (``(rows, n)``, contiguous), summed over ``factors``.

    One write pass for the first adapter, one read-modify-write pass (``addcmul_``) per further adapter; the
    per-run broadcast ``B[j] * A[g]`` reads only the tiny factors.
    """
    start, stop = rows.start, rows.stop
    n = out.shape[1]
    whole = start == 0 and stop == out_features
    for i, f in enumerate(factors):
        A = f.A.to(out.dtype)
        # The scale goes into the (m,) vector, in the factor's own dtype, not into a weight-sized pass.
        B = ((f.B if whole else f.B[start:stop]) * f.scale).to(out.dtype)
        runs = _group_runs(out_features, A.shape[0], start, stop)
        for row0, g0, groups, size in runs:
            if len(runs) == 1:  # the usual case (even groups, whole groups in the block): no slicing
                o, b = out.view(groups, size, n), B.view(groups, size, 1)
                a = (A if groups == A.shape[0] else A[g0 : g0 + groups]).unsqueeze(1)
            else:
                o = out[row0 - start : row0 - start + groups * size].view(groups, size, n)
                b = B[row0 - start : row0 - start + groups * size].view(groups, size, 1)
                a = A[g0 : g0 + groups].unsqueeze(1)
            if i == 0:
                torch.mul(b, a, out=o)
            else:
                o.addcmul_(b, a)


def delta_factor(
    factors: Sequence[AdapterFactors],
    out_features: int,
    dtype: torch.dtype,
    rows: Optional[slice] = None,
) -> torch.Tensor:
    """``D`` (the factor minus one) for the rows ``rows`` of the layer, summed over ``factors``, in ``dtype``.

    This is the one definition of the SPP factor: the kernel, the merge and the tests all build it here.
    """
    if not factors:
        raise ValueError("delta_factor needs at least one adapter")
    rows = rows or slice(0, out_features)
    f0 = factors[0]
    out = torch.empty(rows.stop - rows.start, f0.A.shape[1], dtype=dtype, device=f0.A.device)
    _write_delta(out, factors, out_features, rows)
    return out


def _build_weight(
    out: torch.Tensor,
    weight_out_in: torch.Tensor,
    factors: Sequence[AdapterFactors],
    include_base: bool,
    rows: slice,
) -> torch.Tensor:
    """Write ``W * (1 + D)`` (or ``W * D``) of ``rows`` into ``out``: ``D`` is written first, then one fused
    ``addcmul(W, W, D)`` (or ``mul``) pass in place. The arithmetic runs in the promoted dtype of ``W`` and
    ``D`` (fp32 for bf16 tensors on CPU and CUDA) and is rounded once, into ``out``'s dtype."""
    _write_delta(out, factors, weight_out_in.shape[0], rows)
    w = weight_out_in[rows]
    if include_base:
        # W + W * D, never W * (1 + D): in bf16, 1 + D would round a small D away before it meets W.
        return torch.addcmul(w, w, out, out=out)
    return torch.mul(out, w, out=out)


def effective_weight(
    weight_out_in: torch.Tensor,
    factors: Sequence[AdapterFactors],
    include_base: bool = True,
    rows: Optional[slice] = None,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``W * (1 + D)`` (or only ``W * D`` when ``include_base=False``) for ``rows`` of an (out, in) weight.

    Computed as ``W + W * D`` (one fused ``addcmul``) in ``dtype`` (default: the weight's), never as
    ``W * (1 + D)``: in bf16 ``1 + D`` would round away a small ``D`` entirely, while ``W * D`` keeps its
    full relative precision. Returns a new tensor; ``weight_out_in`` is never written.
    """
    dtype = dtype or weight_out_in.dtype
    m, n = weight_out_in.shape
    rows = rows or slice(0, m)
    out = torch.empty(rows.stop - rows.start, n, dtype=dtype, device=weight_out_in.device)
    return _build_weight(out, weight_out_in, factors, include_base, rows)


# Default row chunking, chosen by measurement (benchmarks/README.md, "Row chunking"; CPU fp32, 1 thread, 1024
# tokens, 1024->1024 / 1024->2816 / 2816->1024): blocks of 256 or 512 rows cut the layer's peak memory by
# 17-38% (to below LoRA r=8's) but cost time: +1% to +19% in the fastest rounds of two runs (medians -7% to
# +9%, the shared machine's noise), from more, smaller GEMMs and the D build and reductions split into more
# ops; never a clear gain. One block keeps a single weight-sized temporary alive, the size of
# the gradient that full fine-tuning allocates, and a SmolLM2-135M training step then already peaks below
# LoRA's. So ``chunk_rows=None`` (one block) is the default and chunking is the opt-in low-memory mode for
# layers whose temporary is too large (it bounds the temporary to ``chunk_rows x n``).
DEFAULT_CHUNK_ROWS: Optional[int] = None


def _row_blocks(out_features: int, chunk_rows: Optional[int]) -> list[slice]:
    """Split the output rows into blocks of ``chunk_rows`` rows (the last one shorter); blocks need not align
    with groups: a group cut by a block boundary is simply a shorter run (see :func:`_group_runs`)."""
    if not chunk_rows or chunk_rows >= out_features:
        return [slice(0, out_features)]
    return [slice(i, min(i + chunk_rows, out_features)) for i in range(0, out_features, chunk_rows)]


def _accumulate_factor_grads(
    gw: torch.Tensor,
    factors: Sequence[AdapterFactors],
    out_features: int,
    rows: slice,
    grads_A: list,
    grads_B: list,
    needs: list,
) -> None:
    """Add the gradients of ``A`` and ``B`` from ``gw = dL/dD`` (= ``G * W``) of the rows ``rows``.

    ``dL/dB[j] = s * sum_k gw[j, k] A[g(j), k]`` and ``dL/dA[g, k] = s * sum_{j in g} gw[j, k] B[j]``: per
    run of groups, two batched matrix-vector products that each read ``gw`` once. ``grad_B`` is computed as
    ``(groups, 1, n) @ (groups, n, size)`` because the other orientation, ``(groups, size, n) @ (groups, n,
    1)``, hits a slow batched-GEMV path on CPU (measured 5-20x slower on the benchmark shapes).

    ``grads_A[i]`` / ``grads_B[i]`` start as ``None`` and are allocated on first use (``needs[i] = (need_A,
    need_B)``); a run that covers a whole gradient (one block, even groups: the usual case) writes it
    directly, with no zero-filled accumulator and no temporary.
    """
    start = rows.start
    n = gw.shape[1]
    for i, f in enumerate(factors):
        need_A, need_B = needs[i]
        if not (need_A or need_B):
            continue
        A = f.A.to(gw.dtype)
        B = f.B.to(gw.dtype)
        r = A.shape[0]
        for row0, g0, groups, size in _group_runs(out_features, r, rows.start, rows.stop):
            gw3 = gw[row0 - start : row0 - start + groups * size].view(groups, size, n)
            if need_B:  # (groups, 1, n) @ (groups, n, size)
                part = torch.bmm(A[g0 : g0 + groups].unsqueeze(1), gw3.transpose(1, 2)).view(-1)
                if grads_B[i] is None and groups * size == out_features:
                    grads_B[i] = part.mul_(f.scale)
                else:
                    if grads_B[i] is None:
                        grads_B[i] = gw.new_zeros(out_features)
                    grads_B[i][row0 : row0 + groups * size].add_(part, alpha=f.scale)
            if need_A:  # (groups, 1, size) @ (groups, size, n)
                part = torch.bmm(B[row0 : row0 + groups * size].view(groups, 1, size), gw3).view(groups, n)
                if grads_A[i] is None and groups == r and groups * size == out_features:
                    grads_A[i] = part.mul_(f.scale)
                else:
                    if grads_A[i] is None:
                        grads_A[i] = gw.new_zeros(r, n)
                    grads_A[i][g0 : g0 + groups].add_(part, alpha=f.scale)


class SPPLinearFunction(torch.autograd.Function):
    """``y = x @ W'^T + bias`` with ``W' = W * (1 + D)`` (or ``y = x @ (W * D)^T`` when ``include_base`` is
    False, the adapter branch used with dropout), saving only ``x`` for backward.

    Inputs after the fixed arguments are the flattened ``A_1, B_1, A_2, B_2, ...`` of the active adapters,
    so autograd sees them as leaves. ``weight`` is frozen (no gradient is computed for it) and may have a
    different dtype than ``x`` (it is cast inside the fused build, so no cast copy is saved); ``bias`` gets
    its gradient when it requires one. ``weight`` may also be a function returning the weight (a quantized
    base dequantizes on demand): it is then called in forward and again in backward, so no dequantized copy
    stays alive between the two, as bitsandbytes' own 4-bit matmul does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fan_in_fan_out, include_base, scales, chunk_rows, *tensors):
        factors = [AdapterFactors(tensors[2 * i], tensors[2 * i + 1], s) for i, s in enumerate(scales)]
        ctx.weight_fn = weight if callable(weight) else None
        if ctx.weight_fn is not None:
            weight = ctx.weight_fn()
        w = weight.T if fan_in_fan_out else weight
        m, n = w.shape
        blocks = _row_blocks(m, chunk_rows)
        buf = x.new_empty(blocks[0].stop - blocks[0].start, n)  # the one weight-sized (or block) temporary
        if len(blocks) == 1:
            y = F.linear(x, _build_weight(buf, w, factors, include_base, blocks[0]), bias)
        else:
            x2 = x.reshape(-1, n)
            y2 = x.new_empty(x2.shape[0], m)
            for rows in blocks:
                wb = _build_weight(buf[: rows.stop - rows.start], w, factors, include_base, rows)
                torch.mm(x2, wb.T, out=y2[:, rows])  # a column slice is a valid GEMM output: no copy
            if bias is not None:
                y2 += bias
            y = y2.view(*x.shape[:-1], m)
        del buf
        # A dequantized weight is rebuilt in backward rather than saved (an empty placeholder keeps the layout).
        ctx.save_for_backward(x, weight if ctx.weight_fn is None else x.new_empty(0), *tensors)
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
        if ctx.weight_fn is not None:
            weight = ctx.weight_fn()
        factors = [AdapterFactors(tensors[2 * i], tensors[2 * i + 1], s) for i, s in enumerate(ctx.scales)]
        w = weight.T if ctx.fan_in_fan_out else weight
        m, n = w.shape
        need_x = ctx.needs_input_grad[0]
        needs = [(ctx.needs_input_grad[7 + 2 * i], ctx.needs_input_grad[8 + 2 * i]) for i in range(len(factors))]
        need_factors = any(a or b for a, b in needs)
        grads_A: list = [None] * len(factors)
        grads_B: list = [None] * len(factors)

        x2 = x.reshape(-1, n)
        gy2 = grad_y.reshape(-1, m).to(x.dtype)
        blocks = _row_blocks(m, ctx.chunk_rows)
        buf = x.new_empty(blocks[0].stop - blocks[0].start, n)  # the one weight-sized (or block) temporary
        grad_x = None
        for rows in blocks:
            b = buf[: rows.stop - rows.start]
            gy_rows = gy2[:, rows] if len(blocks) > 1 else gy2
            if need_x:
                wb = _build_weight(b, w, factors, ctx.include_base, rows)
                grad_x = torch.mm(gy_rows, wb) if grad_x is None else grad_x.addmm_(gy_rows, wb)
            if need_factors:
                # dL/dD = (grad_y^T x) * W: the one weight-sized contraction over tokens serves both factors;
                # it overwrites W' (no longer needed) in the same buffer.
                torch.mm(gy_rows.T, x2, out=b)
                b.mul_(w[rows])
                _accumulate_factor_grads(b, factors, m, rows, grads_A, grads_B, needs)
        del buf

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
    chunk_rows: Optional[int] = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Apply the SPP linear map (see :class:`SPPLinearFunction`) in ``x``'s dtype.

    Args:
        x: input ``(..., n)``.
        weight: the frozen base weight, ``(m, n)`` or ``(n, m)`` when ``fan_in_fan_out``; any floating dtype
            (it is cast to ``x``'s dtype inside the fused build of ``W'``, never copied as a whole); or a
            function returning it (quantized bases: dequantized in forward and again in backward).
        bias: the frozen base bias or ``None`` (ignored when ``include_base`` is False).
        factors: the active adapters' ``A``, ``B`` and scale.
        fan_in_fan_out: the weight is stored ``(in, out)`` (GPT-2's ``Conv1D``).
        include_base: compute ``x @ W'^T + bias``; if False only the adapter branch ``x @ (W * D)^T``.
        chunk_rows: process the output rows in blocks of this many rows, bounding the weight-sized
            temporary to one block (slower: more, smaller matmuls). ``None`` = one block (the default,
            see ``DEFAULT_CHUNK_ROWS``).
    """
    if not factors:
        raise ValueError("spp_linear needs at least one adapter")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    bias = bias.to(x.dtype) if (bias is not None and include_base) else None
    flat = []
    for f in factors:
        flat += [f.A, f.B]
    if not torch.is_grad_enabled() or not (x.requires_grad or any(t.requires_grad for t in flat)):
        # Inference: nothing to save, one effective weight, one matmul.
        weight = weight() if callable(weight) else weight
        w = weight.T if fan_in_fan_out else weight
        return F.linear(x, effective_weight(w, factors, include_base, dtype=x.dtype), bias)
    scales = tuple(float(f.scale) for f in factors)
    return SPPLinearFunction.apply(x, weight, bias, fan_in_fan_out, include_base, scales, chunk_rows, *flat)
