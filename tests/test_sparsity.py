"""spp_peft.sparsity: pattern detection, fingerprints, reports and the zero-set assertion."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spp_peft.sparsity import (
    SparsityViolation,
    assert_same_sparsity,
    describe_mask,
    detect_pattern,
    mask_fingerprint,
    nm_compliance,
    parse_nm,
    sparsity_report,
    zero_mask,
)


def nm_mask(rows, cols, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, cols // m, m, generator=g)
    idx = scores.argsort(dim=-1)[..., :n]
    zeros = torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, idx, True)
    return zeros.view(rows, cols)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (6, 8), (8, 16)])
def test_detects_nm_patterns(n, m):
    zeros = nm_mask(16, 64, n, m)
    assert detect_pattern(zeros) == f"{n}:{m}"
    assert nm_compliance(zeros, n, m) == 1.0


def test_detects_dense_and_unstructured():
    assert detect_pattern(torch.zeros(4, 8, dtype=torch.bool)) == "dense"
    zeros = torch.zeros(4, 8, dtype=torch.bool)
    zeros[0, :4] = True  # other rows have no zero at all
    assert detect_pattern(zeros) == "unstructured"
    assert nm_compliance(zeros, 2, 4) == pytest.approx(1 / 8)


def test_2of4_is_reported_as_2of4_not_4of8():
    assert detect_pattern(nm_mask(8, 32, 2, 4)) == "2:4"


def test_fingerprint_identifies_masks():
    a = nm_mask(8, 32, 2, 4, seed=0)
    b = a.clone()
    assert mask_fingerprint(a) == mask_fingerprint(b)
    b[3, 5] = ~b[3, 5]
    assert mask_fingerprint(a) != mask_fingerprint(b)
    assert mask_fingerprint(a) != mask_fingerprint(a.reshape(16, 16))  # shape is part of it
    odd = torch.zeros(3, 5, dtype=torch.bool)  # 15 bits: not a multiple of 8
    odd2 = odd.clone()
    odd2[2, 4] = True
    assert mask_fingerprint(odd) != mask_fingerprint(odd2)


def test_describe_mask_reads_conv1d_layout_along_inputs():
    w = torch.randn(16, 64)
    w[nm_mask(16, 64, 2, 4)] = 0
    record = describe_mask(w.T.contiguous(), fan_in_fan_out=True)
    assert record.pattern == "2:4" and record.shape == [16, 64] and record.sparsity == 0.5
    assert record.fingerprint == describe_mask(w).fingerprint


@pytest.mark.parametrize("bad", ["2-4", "4:2", "0:4", "a:b", "2:4:8"])
def test_parse_nm_rejects_bad_patterns(bad):
    with pytest.raises(ValueError, match="N:M pattern"):
        parse_nm(bad)


def model_with_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[nm_mask(8, 16, 2, 4)] = 0
        model[2].weight[nm_mask(4, 8, 2, 4)] = 0
    return model


def test_sparsity_report_totals_and_compliance():
    report = sparsity_report(model_with_masks(), expected_pattern="2:4")
    assert [l.name for l in report.layers] == ["0", "2"]
    assert report.total_zeros == 64 + 16 and report.total_params == 128 + 32
    assert report.total_sparsity == pytest.approx(0.5)
    assert report.compliant("2:4") == []
    assert report.compliant("4:8") == []  # 2:4 implies 4:8
    data = report.to_dict()
    assert data["noncompliant_layers"] == [] and data["layers"][0]["pattern"] == "2:4"
    text = report.format()
    assert "2:4 compliance: all layers" in text and "50.00%" in text


def test_noncompliant_layer_is_named():
    model = model_with_masks()
    with torch.no_grad():
        model[2].weight[0, :4] = 1.0  # break one group
    report = sparsity_report(model, expected_pattern="2:4")
    assert report.compliant("2:4") == ["2"]
    assert "1 layer(s) fail, first: 2" in report.format()


def test_assert_same_sparsity_names_the_layer():
    before = model_with_masks()
    after = model_with_masks()
    assert all(c.unchanged for c in assert_same_sparsity(before, after).values())
    with torch.no_grad():
        idx = zero_mask(after[2].weight).nonzero()[0]
        after[2].weight[tuple(idx)] = 0.3
    with pytest.raises(SparsityViolation, match="module '2' turned 1 zero weight"):
        assert_same_sparsity(before, after)


def test_assert_same_sparsity_new_zeros_policy():
    before = model_with_masks()
    after = model_with_masks()
    with torch.no_grad():
        idx = (~zero_mask(after[0].weight)).nonzero()[0]
        after[0].weight[tuple(idx)] = 0.0
    with pytest.raises(SparsityViolation, match="non-zero weight"):
        assert_same_sparsity(before, after)
    with pytest.warns(UserWarning, match="non-zero weight"):
        changes = assert_same_sparsity(before, after, allow_new_zeros=True)
    assert changes["0"].new_zeros == 1


def test_assert_same_sparsity_missing_layer():
    with pytest.raises(SparsityViolation, match="missing"):
        assert_same_sparsity(model_with_masks(), nn.Sequential(nn.Linear(16, 8)))


def test_zero_set_change_counts_when_fill_is_impossible():
    from spp_peft.sparsity import zero_set_change

    before = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]])
    scaled = before * torch.tensor([[5.0, 0.5, 0.0], [2.0, 7.0, 1.5]])  # one new zero at (0, 2)
    for cannot_fill in (True, False):
        change = zero_set_change(before, scaled, zeros_cannot_fill=cannot_fill)
        assert (change.filled, change.new_zeros) == (0, 1)
    assert zero_set_change(before, before * 3, zeros_cannot_fill=True).unchanged


def test_zero_set_change_falls_back_when_counts_contradict_the_guarantee():
    from spp_peft.sparsity import zero_set_change

    before = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    filled = torch.tensor([[0.5, 1.0], [2.0, 0.0]])  # fewer zeros after: impossible if the claim held
    change = zero_set_change(before, filled, zeros_cannot_fill=True)
    assert (change.filled, change.new_zeros) == (1, 0)


def test_merge_with_non_finite_factor_uses_the_elementwise_check():
    """A factor of inf turns 0 * inf into NaN: a filled zero, caught by the full comparison."""
    from peft import get_peft_model

    import spp_peft

    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, :4] = 0
    peft_model = get_peft_model(model, spp_peft.SPPConfig(target_modules=["0"], r=1, spp_alpha=1))
    layer = peft_model.base_model.model[0]
    with torch.no_grad():
        layer.spp_B["default"].fill_(float("inf"))
    assert not layer._factor_is_finite(["default"])
    before = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(SparsityViolation, match="turned 16 zero weight"):
        peft_model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, before)
