"""Property-based: for random shapes, r, patterns, dtypes and factors, merge_and_unload keeps the zero
pattern exactly and agrees with the unmerged forward."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import get_peft_model
from torch import nn

from spp_peft import SPPConfig, assert_same_sparsity

from .conftest import prune_weight_

PATTERNS = ["unstructured30", "unstructured50", "unstructured75", "unstructured90", "1:4", "2:4", "4:8", "6:8"]


class One(nn.Module):
    def __init__(self, n, m, bias):
        super().__init__()
        self.proj = nn.Linear(n, m, bias=bias)

    def forward(self, x):
        return self.proj(x)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(1, 48),
    n_blocks=st.integers(1, 6),
    r_frac=st.floats(0.0, 1.0),
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    n_adapters=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_merge_and_unload_keeps_zero_pattern(m, n_blocks, r_frac, pattern, dtype, n_adapters, bias, seed):
    torch.manual_seed(seed)
    n = 8 * n_blocks
    model = One(n, m, bias)
    with torch.no_grad():
        prune_weight_(model.proj.weight, pattern)
    model = model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = 1 + int(r_frac * (m - 1))
    peft_model = get_peft_model(model, SPPConfig(target_modules=["proj"], r=r, spp_alpha=2.0 * r,
                                                 init_weights=False))
    if n_adapters == 2:
        peft_model.add_adapter("b", SPPConfig(target_modules=["proj"], r=max(1, r // 2), init_weights=False,
                                              spp_alpha=max(1, r // 2)))
        peft_model.base_model.set_adapter(["default", "b"])
    x = torch.randn(4, n, dtype=dtype)
    with torch.no_grad():
        unmerged = peft_model(x).float()
        merged_model = peft_model.merge_and_unload()
        merged = merged_model(x).float()
    tol = {torch.float32: 1e-4, torch.float16: 3e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(merged, unmerged, rtol=tol, atol=tol)
    assert_same_sparsity(before, merged_model.state_dict())
