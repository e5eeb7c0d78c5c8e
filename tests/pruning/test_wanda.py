"""Wanda: the mask equals a direct computation of |W_ij| * ||X_j||_2 on real activations."""

from __future__ import annotations

import pytest
import torch

from spp_peft.models import find_linears
from spp_peft.testing import tiny_llama
from spp_peft.pruning import prune
from spp_peft.pruning.wanda import InputNormStats, wanda_mask
from spp_peft.sparsity import as_out_in, conv1d_class, nm_compliance, zero_mask, zeros_per_group

from .conftest import MODEL_FACTORIES, block_weights


def layer_inputs(model, ids, names) -> dict[str, torch.Tensor]:
    """Inputs of the named layers during a plain forward pass, as (tokens, in) float64."""
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    layers = find_linears(model)
    handles = [
        layers[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n in names
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in seen.items()}


def direct_wanda_mask(weight: torch.Tensor, x: torch.Tensor, sparsity=None, nm=None) -> torch.Tensor:
    """The definition, computed independently: per row, zero the lowest |W_ij| * ||X_j||_2."""
    score = weight.double().abs() * x.pow(2).sum(dim=0).sqrt()
    mask = torch.zeros_like(score, dtype=torch.bool)
    if nm is None:
        k = int(score.shape[1] * sparsity)
        for r in range(score.shape[0]):
            mask[r, score[r].argsort()[:k]] = True
    else:
        n, m = nm
        for r in range(score.shape[0]):
            for g in range(0, score.shape[1], m):
                mask[r, g + score[r, g : g + m].argsort()[:n]] = True
    return mask


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_block0_masks_equal_the_definition(model_factory, calib_ids, pattern):
    model = model_factory()
    names = [n for n in find_linears(model) if ".0." in n]
    inputs = layer_inputs(model, calib_ids, names)
    before = block_weights(model)
    prune(model, "wanda", 0.5, pattern, calibration=calib_ids, show_progress=False)
    after = block_weights(model)
    nm = (2, 4) if pattern == "2:4" else None
    for name in names:
        expected = direct_wanda_mask(before[name], inputs[name], 0.5, nm)
        assert torch.equal(zero_mask(after[name]), expected), name
        kept = ~expected
        assert torch.equal(after[name][kept], before[name][kept]), "wanda must not update kept weights"


def test_later_blocks_are_calibrated_on_pruned_outputs(calib_ids):
    # Block 1's attention inputs must come from the *pruned* block 0 (sequential recomputation).
    model = tiny_llama()
    before = block_weights(model)
    prune(model, "wanda", 0.5, calibration=calib_ids, show_progress=False)
    name = "model.layers.1.self_attn.q_proj"
    x_pruned = layer_inputs(model, calib_ids, [name])[name]  # pruned model: block 0 is pruned
    dense = tiny_llama()
    x_dense = layer_inputs(dense, calib_ids, [name])[name]
    got = zero_mask(block_weights(model)[name])
    assert torch.equal(got, direct_wanda_mask(before[name], x_pruned, 0.5))
    assert not torch.equal(got, direct_wanda_mask(before[name], x_dense, 0.5))


def test_every_pruned_layer_has_exact_row_sparsity_and_nm(model_factory, calib_ids):
    model = model_factory()
    prune(model, "wanda", 0.6, calibration=calib_ids, show_progress=False)
    for name, w in block_weights(model).items():
        assert bool((zero_mask(w).sum(dim=1) == int(w.shape[1] * 0.6)).all()), name
    model = model_factory()
    result = prune(model, "wanda", pattern="4:8", calibration=calib_ids, show_progress=False)
    for name, w in block_weights(model).items():
        assert nm_compliance(zero_mask(w), 4, 8) == 1.0
        assert bool((zeros_per_group(zero_mask(w), 8) == 4).all()), name
    assert result.report.compliant("4:8") == []


def test_input_norm_stats_accumulate_in_float32():
    stats = InputNormStats(3)
    a = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.bfloat16)
    stats.add_batch(a.reshape(1, 2, 3))
    stats.add_batch(torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float16))
    assert stats.sum_sq.dtype == torch.float32 and stats.tokens == 3
    assert torch.allclose(stats.norms, torch.tensor([10.0, 4.0, 4.0]).sqrt())
    with pytest.raises(ValueError, match="expected 3 input features"):
        stats.add_batch(torch.ones(2, 4))


def test_activation_norm_changes_the_choice():
    # Same |W| everywhere but input 0 is much larger: Wanda keeps column 0, magnitude could not tell.
    weight = torch.ones(2, 4)
    mask = wanda_mask(weight, torch.tensor([10.0, 1.0, 2.0, 3.0]), 0.5)
    assert mask.tolist() == [[False, True, True, False]] * 2


def test_identical_masks_run_to_run(calib_ids):
    masks = []
    for _ in range(2):
        model = tiny_llama(num_kv_heads=2)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.round(p * 16) / 16)  # many exact ties, as in 4-bit GGUF weights
        prune(model, "wanda", pattern="2:4", calibration=calib_ids, show_progress=False)
        masks.append({k: zero_mask(v) for k, v in block_weights(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_missing_or_malformed_calibration(calib_ids):
    with pytest.raises(ValueError, match="wanda needs calibration data"):
        prune(tiny_llama(), "wanda", show_progress=False)
    with pytest.raises(ValueError, match=r"\(nsamples, seqlen\) LongTensor"):
        prune(tiny_llama(), "wanda", calibration=calib_ids.float(), show_progress=False)
    with pytest.raises(ValueError, match=r"\(nsamples, seqlen\) LongTensor"):
        prune(tiny_llama(), "wanda", calibration=calib_ids[0], show_progress=False)


def test_training_mode_and_device_are_restored(calib_ids):
    model = MODEL_FACTORIES["gpt2"]()
    model.train()
    prune(model, "wanda", calibration=calib_ids, show_progress=False)
    assert model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    conv1d = conv1d_class()
    assert isinstance(model.transformer.h[0].mlp.c_fc, conv1d)
    zeros = zero_mask(as_out_in(model.transformer.h[0].mlp.c_fc.weight, True))
    assert bool((zeros.sum(dim=1) == zeros.shape[1] // 2).all())
