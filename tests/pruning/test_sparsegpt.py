"""SparseGPT: exact sparsity, lazy-update correctness, and lower reconstruction error than Wanda/magnitude."""

from __future__ import annotations

import pytest
import torch

from spp_peft.models import find_linears
from spp_peft.testing import tiny_llama
from spp_peft.pruning import prune
from spp_peft.pruning.magnitude import magnitude_mask
from spp_peft.pruning.sparsegpt import HessianStats, sparsegpt_prune
from spp_peft.pruning.wanda import wanda_mask
from spp_peft.sparsity import nm_compliance, zero_mask, zeros_per_group

from .conftest import block_weights
from .test_wanda import layer_inputs


@pytest.fixture(scope="module")
def real_layer_data(calib_ids):
    """(W, X) of every block-0 layer of a tiny Llama fed real text: X is (tokens, in) float32."""
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    names = [n for n in find_linears(model) if ".0." in n]
    inputs = layer_inputs(model, calib_ids, names)
    weights = block_weights(model)
    return {n: (weights[n].float(), inputs[n].float()) for n in names}


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    stats = HessianStats(x.shape[1])
    stats.add_batch(x)
    return stats.hessian()


def output_error(w, w_pruned, x) -> float:
    return float(torch.linalg.norm((w - w_pruned).double() @ x.double().T))


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_layer_error_below_wanda_and_magnitude(real_layer_data, pattern):
    nm = (2, 4) if pattern == "2:4" else None
    for name, (w, x) in real_layer_data.items():
        w_sgpt, mask = sparsegpt_prune(w, hessian_of(x), 0.5, nm)
        w_wanda = w.masked_fill(wanda_mask(w, x.pow(2).sum(0).sqrt(), 0.5, nm), 0)
        w_mag = w.masked_fill(magnitude_mask(w, 0.5, nm), 0)
        e_sgpt, e_wanda, e_mag = (output_error(w, v, x) for v in (w_sgpt, w_wanda, w_mag))
        assert e_sgpt < e_wanda and e_sgpt < e_mag, (name, e_sgpt, e_wanda, e_mag)
        assert torch.equal(zero_mask(w_sgpt), mask)


def test_exact_layer_sparsity_and_nm_on_the_whole_model(model_factory, calib_ids):
    model = model_factory()
    result = prune(model, "sparsegpt", 0.5, calibration=calib_ids, blocksize=32, show_progress=False)
    for name, w in block_weights(model).items():
        assert int(zero_mask(w).sum()) == w.numel() // 2, name
        assert bool(torch.isfinite(w).all())
    assert abs(result.report.total_sparsity - 0.5) < 1e-12
    model = model_factory()
    result = prune(model, "sparsegpt", pattern="2:4", calibration=calib_ids, show_progress=False)
    for name, w in block_weights(model).items():
        assert bool((zeros_per_group(zero_mask(w), 4) == 2).all()), name
    assert result.report.compliant("2:4") == []


def test_odd_sparsity_counts_sum_exactly_over_blocks(real_layer_data):
    w, x = real_layer_data["model.layers.0.mlp.down_proj"]  # (64, 128)
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.37, blocksize=48)  # blocks of 48, 48, 32 columns
    assert int(mask.sum()) == int(w.numel() * 0.37) == int(zero_mask(new).sum())


def test_lazy_block_updates_do_not_change_the_nm_result(real_layer_data):
    # For N:M the mask of a group is chosen when the group is reached, so the result is the same whatever
    # the lazy-update block size: a check of the in-block and after-block OBS error propagation.
    w, x = real_layer_data["model.layers.0.mlp.gate_proj"]
    h = hessian_of(x)
    results = [sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=b) for b in (4, 16, 64)]
    for new, mask in results[1:]:
        assert torch.equal(mask, results[0][1])
        assert torch.allclose(new, results[0][0], atol=1e-5, rtol=1e-4)


def test_identity_hessian_reduces_to_magnitude_pruning():
    # With uncorrelated inputs of equal scale there is nothing to compensate: SparseGPT == magnitude.
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    h = 2 * torch.eye(32)
    new, mask = sparsegpt_prune(w, h, 0.5, blocksize=32)
    assert torch.equal(mask, magnitude_mask(w, 0.5, comparison="layer"))
    assert torch.allclose(new, w.masked_fill(mask, 0))
    new, mask = sparsegpt_prune(w, h, 0.5, (2, 4), blocksize=8)
    assert torch.equal(mask, magnitude_mask(w, 0.5, (2, 4)))


def test_dead_inputs_are_zeroed_and_pruned_first():
    torch.manual_seed(1)
    x = torch.randn(256, 16)
    x[:, [3, 7]] = 0.0  # never active
    w = torch.randn(8, 16)
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.25, blocksize=16)
    assert bool(torch.isfinite(new).all())
    assert bool(mask[:, [3, 7]].all()) and bool((new[:, [3, 7]] == 0).all())
    assert int(mask.sum()) == 32


def test_zero_sparsity_leaves_weights_unchanged(real_layer_data):
    w, x = real_layer_data["model.layers.0.self_attn.q_proj"]
    new, mask = sparsegpt_prune(w, hessian_of(x), 0.0)
    assert not bool(mask.any()) and torch.equal(new, w)


def test_determinism_and_errors(calib_ids):
    masks = []
    for _ in range(2):
        model = tiny_llama(num_kv_heads=2)
        prune(model, "sparsegpt", 0.5, calibration=calib_ids, show_progress=False)
        masks.append({k: v.clone() for k, v in block_weights(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    with pytest.raises(ValueError, match="sparsegpt needs calibration data"):
        prune(tiny_llama(), "sparsegpt", show_progress=False)
    with pytest.raises(ValueError, match="Hessian"):
        sparsegpt_prune(torch.ones(2, 4), torch.eye(3), 0.5)
    with pytest.raises(ValueError, match="multiple of M=4"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), 0.5, (2, 4), blocksize=6)
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(torch.ones(2, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 0.5, percdamp=0.0)
    with pytest.raises(RuntimeError, match="no calibration input"):
        HessianStats(4).hessian()
