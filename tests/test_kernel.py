"""The SPP kernel (spp_peft/kernel.py) against autograd through the materialised formula.

The reference here is written independently of the kernel: ``D[j, k] = sum_a s_a * B_a[j] * A_a[g(j), k]``
with ``g(j) = floor(j * r / m)`` spelled out with integer arithmetic, and ``y = x @ (W * (1 + D))^T + b``
differentiated by plain autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from spp_peft.kernel import (
    AdapterFactors,
    SPPLinearFunction,
    _group_runs,
    delta_factor,
    effective_weight,
    group_index,
    spp_linear,
)

DOUBLE = torch.float64


# ----------------------------------------------------------------------------------------- reference


def ref_groups(m: int, r: int) -> torch.Tensor:
    return torch.tensor([j * r // m for j in range(m)])


def ref_delta(factors, m: int) -> torch.Tensor:
    return sum(f.scale * f.B.unsqueeze(1) * f.A[ref_groups(m, f.A.shape[0])] for f in factors)


def ref_linear(x, weight, bias, factors, fan_in_fan_out=False, include_base=True):
    w = weight.T if fan_in_fan_out else weight
    D = ref_delta(factors, w.shape[0])
    w_eff = w * (1 + D) if include_base else w * D
    return F.linear(x, w_eff, bias if include_base else None)


def make_case(m, n, rs, *, batch=(3, 2), fan_in_fan_out=False, dtype=DOUBLE, sparsity=0.4, seed=0):
    """x (batch..., n) and W (m, n) (stored (n, m) for Conv1D) with zeros, bias, and (A, B) per r."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, generator=g, dtype=DOUBLE)
    W = torch.randn(m, n, generator=g, dtype=DOUBLE)
    W[torch.rand(m, n, generator=g) < sparsity] = 0
    if fan_in_fan_out:
        W = W.T.contiguous()
    bias = torch.randn(m, generator=g, dtype=DOUBLE)
    params = []
    for r in rs:
        params += [torch.randn(r, n, generator=g, dtype=DOUBLE), torch.randn(m, generator=g, dtype=DOUBLE)]
    cast = [t.to(dtype) for t in (x, W, bias, *params)]
    return cast[0], cast[1], cast[2], cast[3:]


def scales_for(rs):
    return [0.5 + 0.75 * i for i in range(len(rs))]


def factors_of(params, scales):
    return [AdapterFactors(params[2 * i], params[2 * i + 1], s) for i, s in enumerate(scales)]


# ----------------------------------------------------------------------------------------- gradcheck

CASES = {
    # id: (m, n, rs, fan_in_fan_out, include_base, chunk_rows, with_bias)
    "even": (12, 7, [4], False, True, None, False),
    "uneven": (10, 6, [4], False, True, None, False),
    "gqa_kv_uneven": (6, 9, [4], False, True, None, False),  # k/v of a GQA model: few rows, r not dividing m
    "r1": (9, 5, [1], False, True, None, False),
    "r_eq_m": (7, 5, [7], False, True, None, False),
    "three_adapters": (13, 6, [3, 5, 13], False, True, None, False),
    "conv1d": (10, 6, [4], True, True, None, True),
    "conv1d_two_adapters": (9, 4, [3, 2], True, True, 4, False),
    "adapter_branch_only": (12, 5, [4], False, False, None, False),
    "adapter_branch_uneven_chunked": (11, 5, [3, 4], False, False, 4, False),
    "chunk_aligned": (12, 5, [4], False, True, 6, True),
    "chunk_cuts_groups": (12, 5, [4, 5], False, True, 5, False),
    "chunk_one_row": (7, 4, [3], False, True, 1, False),
    "bias": (8, 5, [4], False, True, None, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_gradcheck_against_materialised(case):
    m, n, rs, fifo, include_base, chunk, with_bias = CASES[case]
    x, W, bias, params = make_case(m, n, rs, fan_in_fan_out=fifo)
    scales = scales_for(rs)
    x.requires_grad_()
    for p in params:
        p.requires_grad_()
    bias = bias.requires_grad_() if with_bias else None
    inputs = (x, *params) + ((bias,) if with_bias else ())

    def kernel(x, *rest):
        ps, b = (rest[:-1], rest[-1]) if with_bias else (rest, None)
        return spp_linear(x, W, b, factors_of(ps, scales), fifo, include_base, chunk)

    def reference(x, *rest):
        ps, b = (rest[:-1], rest[-1]) if with_bias else (rest, None)
        return ref_linear(x, W, b, factors_of(ps, scales), fifo, include_base)

    assert torch.autograd.gradcheck(kernel, inputs)
    y, y_ref = kernel(*inputs), reference(*inputs)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert y.grad_fn is not None and "SPPLinearFunction" in type(y.grad_fn).__name__
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, gy)
    grads_ref = torch.autograd.grad(y_ref, inputs, gy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_partial_requires_grad():
    """First layer (x without grad), and only some factors trainable: the others get no gradient."""
    x, W, _, params = make_case(10, 6, [4, 3])
    A1, B1, A2, B2 = params
    A1.requires_grad_()
    B2.requires_grad_()
    y = spp_linear(x, W, None, factors_of(params, [2.0, 0.5]))
    gA1, gB2 = torch.autograd.grad(y.square().sum(), (A1, B2))
    ref = ref_linear(x, W, None, factors_of(params, [2.0, 0.5]))
    rA1, rB2 = torch.autograd.grad(ref.square().sum(), (A1, B2))
    torch.testing.assert_close(gA1, rA1)
    torch.testing.assert_close(gB2, rB2)


def test_needs_an_adapter():
    x, W, _, _ = make_case(4, 3, [])
    with pytest.raises(ValueError):
        spp_linear(x, W, None, [])


# ------------------------------------------------------------------------------------------ inference


@pytest.mark.parametrize("fifo", [False, True])
def test_no_grad_inference_path(fifo):
    x, W, bias, params = make_case(10, 6, [4, 3], fan_in_fan_out=fifo)
    factors = factors_of(params, [2.0, 1.0])
    ref = ref_linear(x, W, bias, factors, fifo)
    # No tensor requires grad: no graph at all.
    y = spp_linear(x, W, bias, factors, fifo)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    # Trainable factors under no_grad (evaluation during training): no graph either.
    for p in params:
        p.requires_grad_()
    with torch.no_grad():
        y = spp_linear(x, W, bias, factors, fifo)
    assert y.grad_fn is None
    torch.testing.assert_close(y, ref.detach(), rtol=1e-12, atol=1e-12)


def test_effective_weight_and_delta_factor_match_reference():
    for m, n, rs in [(12, 5, [4]), (11, 5, [3, 11]), (5, 3, [1])]:
        _, W, _, params = make_case(m, n, rs)
        factors = factors_of(params, scales_for(rs))
        D = ref_delta(factors, m)
        torch.testing.assert_close(delta_factor(factors, m, DOUBLE), D)
        torch.testing.assert_close(delta_factor(factors, m, DOUBLE, slice(2, m - 1)), D[2 : m - 1])
        torch.testing.assert_close(effective_weight(W, factors), W * (1 + D))
        torch.testing.assert_close(effective_weight(W, factors, include_base=False), W * D)
        torch.testing.assert_close(effective_weight(W, factors, rows=slice(1, 4)), (W * (1 + D))[1:4])
        W_before = W.clone()
        effective_weight(W, factors)
        assert torch.equal(W, W_before), "effective_weight must not write the weight"


# ------------------------------------------------------------------------------- low-precision dtypes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", ["even", "uneven_two_adapters_chunked"])
def test_low_precision_against_fp64(dtype, tol, case):
    m, n, rs, chunk = (64, 48, [16], None) if case == "even" else (50, 40, [16, 7], 16)
    scales = [2.0, 0.5][: len(rs)]
    x64, W64, b64, p64 = make_case(m, n, rs, batch=(4, 8))
    # SPP's factor stays near 1 in practice: B ~ 0.1 (trained from zero), A ~ Kaiming.
    p64 = [p * 0.1 if i % 2 else p / math.sqrt(n) for i, p in enumerate(p64)]
    leaves64 = [t.clone().requires_grad_() for t in (x64, *p64)]
    y64 = ref_linear(leaves64[0], W64, b64, factors_of(leaves64[1:], scales))
    gy64 = torch.randn_like(y64)
    grads64 = torch.autograd.grad(y64, leaves64, gy64)

    leaves = [t.detach().to(dtype).requires_grad_() for t in (x64, *p64)]
    y = spp_linear(leaves[0], W64.to(dtype), b64.to(dtype), factors_of(leaves[1:], scales), chunk_rows=chunk)
    assert y.dtype == dtype
    grads = torch.autograd.grad(y, leaves, gy64.to(dtype))
    assert rel_err(y, y64) < tol
    for g, g64, name in zip(grads, grads64, ["x"] + ["A", "B"] * len(rs)):
        assert g.dtype == dtype
        assert rel_err(g, g64) < tol, name


def test_bf16_weight_with_fp32_input_is_cast_inside():
    """A weight in another dtype than x is cast inside the fused build (no cast copy is made or saved)."""
    x, W, _, params = make_case(32, 16, [8], batch=(5,))
    factors = factors_of([p.float() for p in params], [2.0])
    y = spp_linear(x.float(), W.bfloat16(), None, factors)
    ref = ref_linear(x, W.bfloat16().double(), None, factors_of(params, [2.0]))
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-5


# ----------------------------------------------------------------------------------- saved tensors


def saved_storages(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("chunk", [None, 8])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_saves_only_the_input_beyond_existing_tensors(chunk, weight_dtype):
    m, n, T = 64, 48, 10
    torch.manual_seed(0)
    x = torch.randn(T, n, requires_grad=True)
    W = nn.Parameter(torch.randn(m, n).to(weight_dtype), requires_grad=False)
    A1, A2 = nn.Parameter(torch.randn(16, n)), nn.Parameter(torch.randn(5, n))
    B1, B2 = nn.Parameter(torch.randn(m)), nn.Parameter(torch.randn(m))
    factors = [AdapterFactors(A1, B1, 2.0), AdapterFactors(A2, B2, 0.5)]
    y, saved = saved_storages(lambda: spp_linear(x, W, None, factors, chunk_rows=chunk))
    existing = {t.untyped_storage().data_ptr() for t in (x, W, A1, B1, A2, B2)}
    weight_bytes = m * n * 2
    for t in saved:
        new = t.untyped_storage().data_ptr() not in existing
        assert not (new and t.untyped_storage().nbytes() >= weight_bytes), (
            f"a new weight-sized tensor {tuple(t.shape)} {t.dtype} is saved for backward")
        assert not new, f"saved a tensor that is not the input, the weight or a factor: {tuple(t.shape)}"
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    y.sum().backward()  # the saved references are enough for backward

    # The hook does see weight-sized tensors when a formulation saves them (sanity check of the test).
    Ax = A1.detach().requires_grad_()
    _, saved_ref = saved_storages(
        lambda: ref_linear(x, W.float(), None, [AdapterFactors(Ax, B1, 2.0)]))
    assert any(t.numel() >= m * n and t.untyped_storage().data_ptr() not in existing for t in saved_ref)


# --------------------------------------------------------------------------- sparsity is preserved


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 24),
    n=st.integers(1, 12),
    data=st.data(),
)
def test_zeros_of_w_stay_zero_for_any_factors(m, n, data):
    n_adapters = data.draw(st.integers(1, 3))
    rs = [data.draw(st.integers(1, m)) for _ in range(n_adapters)]
    seed = data.draw(st.integers(0, 2**16))
    include_base = data.draw(st.booleans())
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    W[torch.rand(m, n, generator=g) < 0.5] = 0
    zero_rows = torch.rand(m, generator=g) < 0.3
    W[zero_rows] = 0
    # Any factors, including huge ones.
    factors = [AdapterFactors(torch.randn(r, n, generator=g) * 1e4, torch.randn(m, generator=g) * 1e4, 3.0)
               for r in rs]
    rows = data.draw(st.sampled_from([None, slice(0, m), slice(m // 2, m)]))
    w_eff = effective_weight(W, factors, include_base=include_base, rows=rows)
    w_ref = W if rows is None else W[rows]
    assert torch.all(w_eff[w_ref == 0] == 0)
    zr = zero_rows if rows is None else zero_rows[rows]
    assert torch.all(w_eff[zr] == 0)


@settings(max_examples=100, deadline=None)
@given(m=st.integers(1, 60), data=st.data())
def test_group_runs_cover_rows_like_group_index(m, data):
    r = data.draw(st.integers(1, m))
    start = data.draw(st.integers(0, m - 1))
    stop = data.draw(st.integers(start + 1, m))
    expected = group_index(m, r)[start:stop].tolist()
    got, row = [], start
    for row0, g0, groups, size in _group_runs(m, r, start, stop):
        assert row0 == row and size >= 1
        got += [g for g in range(g0, g0 + groups) for _ in range(size)]
        row += groups * size
    assert row == stop and got == expected
    assert ref_groups(m, r).tolist() == group_index(m, r).tolist()


def test_group_index_rejects_bad_r():
    with pytest.raises(ValueError):
        group_index(4, 5)
    with pytest.raises(ValueError):
        group_index(4, 0)


# ------------------------------------------------------------------------------ dropout in the layer


def _spp_layer(m, n, r, dropout, bias=True, dtype=DOUBLE):
    from spp_peft.tuner.layer import Linear

    torch.manual_seed(0)
    base = nn.Linear(n, m, bias=bias).to(dtype)
    with torch.no_grad():
        base.weight[torch.rand(m, n) < 0.4] = 0
    base.weight.requires_grad_(False)
    if bias:
        base.bias.requires_grad_(False)
    layer = Linear(base, "default", r=r, spp_alpha=2.0 * r, spp_dropout=dropout, init_weights=False)
    return layer.to(dtype)


def test_dropout_path_is_exact():
    """spp_dropout > 0 in train mode: y = x W^T + b + dropout(x) (W * D)^T, with the same dropout mask."""
    m, n, r, p = 12, 8, 4, 0.3
    layer = _spp_layer(m, n, r, p)
    layer.train()
    base = layer.get_base_layer()
    A, B = layer.spp_A["default"], layer.spp_B["default"]
    s = layer.scaling["default"]
    x = torch.randn(5, 3, n, dtype=DOUBLE, requires_grad=True)

    torch.manual_seed(1234)
    y = layer(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), gy)

    torch.manual_seed(1234)
    x_drop = F.dropout(x, p, training=True)
    assert (x_drop == 0).any() and (x_drop != 0).any()
    D = s * B.unsqueeze(1) * A[ref_groups(m, r)]
    y_ref = F.linear(x, base.weight, base.bias) + F.linear(x_drop, base.weight * D)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    grads_ref = torch.autograd.grad(y_ref, (x, A, B), gy)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)

    # The kernel's branch alone passes gradcheck too.
    def branch(xd, A, B):
        return spp_linear(xd, base.weight, None, [AdapterFactors(A, B, s)], include_base=False)

    assert torch.autograd.gradcheck(branch, (x_drop.detach().requires_grad_(), A, B))


def test_layer_without_dropout_and_in_eval_uses_the_single_matmul_kernel():
    layer = _spp_layer(12, 8, 4, dropout=0.3)
    x = torch.randn(4, 8, dtype=DOUBLE, requires_grad=True)
    layer.eval()  # eval: dropout is off, the fast path runs
    y = layer(x)
    assert "SPPLinearFunction" in type(y.grad_fn).__name__
    ref = ref_linear(x, layer.get_base_layer().weight, layer.get_base_layer().bias,
                     layer.factors(["default"]))
    torch.testing.assert_close(y, ref)
    layer0 = _spp_layer(12, 8, 4, dropout=0.0)
    layer0.train()
    y0 = layer0(x)
    assert "SPPLinearFunction" in type(y0.grad_fn).__name__


def test_function_is_the_public_autograd_function():
    assert issubclass(SPPLinearFunction, torch.autograd.Function)


def test_weight_given_as_a_function_is_rebuilt_in_backward_not_saved():
    """Quantized bases pass a dequantizing function: same outputs and gradients, called in forward and in
    backward, and no weight-sized tensor kept between the two."""
    torch.manual_seed(0)
    weight = torch.randn(24, 16)
    weight[:, ::2] = 0
    A = torch.randn(4, 16, requires_grad=True)
    B = torch.randn(24, requires_grad=True)
    x = torch.randn(3, 5, 16, requires_grad=True)
    calls = []

    def dequantize():
        calls.append(1)
        return weight.clone()  # a fresh temporary each time, as a dequantization would be

    grads = []
    saved_sizes = []
    for w in (weight, dequantize):
        for t in (A, B, x):
            t.grad = None

        def pack(t):
            saved_sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = spp_linear(x, w, None, [AdapterFactors(A, B, 0.5)])
        y.square().sum().backward()
        grads.append((y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()))
    assert len(calls) == 2
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert weight.numel() not in saved_sizes[len(saved_sizes) // 2:]  # the function's run saved no weight
