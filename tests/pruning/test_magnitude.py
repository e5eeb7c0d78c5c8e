"""Magnitude pruning: exact counts per row / layer, N:M compliance, Conv1D layout, ties, errors."""

from __future__ import annotations

import pytest
import torch

from spp_peft.pruning import prune
from spp_peft.testing import tiny_llama
from spp_peft.pruning.common import num_to_prune
from spp_peft.pruning.magnitude import magnitude_mask
from spp_peft.sparsity import nm_compliance, zero_mask, zeros_per_group

from .conftest import MODEL_FACTORIES, block_weights


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_row_comparison_prunes_exactly_the_smallest_of_each_row(model_factory, sparsity):
    model = model_factory()
    before = block_weights(model)
    result = prune(model, "magnitude", sparsity, show_progress=False)
    after = block_weights(model)
    assert [r.name for r in result.layers] == list(before)
    for name, w0 in before.items():
        w1 = after[name]
        zeros = zero_mask(w1)
        k = int(w0.shape[1] * sparsity + 1e-9)
        assert torch.equal(zeros.sum(dim=1), torch.full((w0.shape[0],), k)), name
        # kept weights are untouched, and every pruned |w| is <= every kept |w| of the same row
        assert torch.equal(w1[~zeros], w0[~zeros])
        pruned_max = w0.abs().masked_fill(~zeros, 0).amax(dim=1)
        kept_min = w0.abs().masked_fill(zeros, float("inf")).amin(dim=1)
        assert bool((pruned_max <= kept_min).all()), name


def test_layer_comparison_is_exact_per_layer_and_global_within_the_layer():
    model = tiny_llama()
    before = block_weights(model)
    prune(model, "magnitude", 0.5, comparison="layer", show_progress=False)
    row_counts_differ = False
    for name, w1 in block_weights(model).items():
        w0 = before[name]
        zeros = zero_mask(w1)
        assert int(zeros.sum()) == w0.numel() // 2, name
        assert float(w0.abs()[zeros].max()) <= float(w0.abs()[~zeros].min())
        row_counts_differ |= bool((zeros.sum(dim=1) != w0.shape[1] // 2).any())
    assert row_counts_differ, "a per-layer threshold should not give every row the same count"


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "3:8"])
def test_nm_patterns_have_exactly_n_zeros_per_group(model_factory, pattern):
    n, m = (int(x) for x in pattern.split(":"))
    model = model_factory()
    before = block_weights(model)
    result = prune(model, "magnitude", pattern=pattern, show_progress=False)
    for name, w1 in block_weights(model).items():
        zeros = zero_mask(w1)
        assert nm_compliance(zeros, n, m) == 1.0, name
        assert bool((zeros_per_group(zeros, m) == n).all()), name
        # inside each group the pruned entries are the smallest in magnitude
        w0 = before[name].reshape(w1.shape[0], -1, m).abs()
        z = zeros.reshape(w1.shape[0], -1, m)
        assert bool((w0.masked_fill(~z, 0).amax(-1) <= w0.masked_fill(z, float("inf")).amin(-1)).all())
    assert result.report.compliant(pattern) == []


def test_conv1d_weights_are_pruned_along_the_input_dimension():
    # GPT-2's Conv1D stores (in, out); rows of the (out, in) view must carry the N:M groups.
    model = MODEL_FACTORIES["gpt2"]()
    prune(model, "magnitude", pattern="2:4", show_progress=False)
    attn = model.transformer.h[0].attn.c_attn  # weight (64, 192): in=64, out=192
    zeros_out_in = zero_mask(attn.weight.detach()).T
    assert zeros_out_in.shape == (192, 64)
    assert nm_compliance(zeros_out_in, 2, 4) == 1.0
    # the stored layout itself is not 2:4 along its rows (that would mean pruning the wrong axis)
    assert nm_compliance(zero_mask(attn.weight.detach()), 2, 4) < 1.0


def test_ties_are_broken_by_position_deterministically():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0, 2.0, 1.0, -1.0, 1.0]])
    mask = magnitude_mask(weight, 0.5)
    assert mask.tolist() == [[True, True, True, True, False, False, False, False]]
    nm = magnitude_mask(weight, 0.5, nm=(2, 4))
    assert nm.tolist() == [[True, True, False, False, False, True, True, False]]


def test_coarsely_quantized_weights_give_identical_masks_run_to_run():
    def quantized_model():
        model = tiny_llama()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.round(p * 16) / 16)  # 4-bit-like grid: many exact ties
        return model

    masks = []
    for _ in range(2):
        model = quantized_model()
        prune(model, "magnitude", 0.5, show_progress=False)
        masks.append({k: zero_mask(v) for k, v in block_weights(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_zero_and_max_sparsity():
    model = tiny_llama()
    before = block_weights(model)
    prune(model, "magnitude", 0.0, show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in block_weights(model).items())
    model = tiny_llama()
    prune(model, "magnitude", 0.95, show_progress=False)
    for name, w in block_weights(model).items():
        assert int(zero_mask(w).sum(dim=1)[0]) == num_to_prune(w.shape[1], 0.95), name


def test_num_to_prune_absorbs_binary_rounding():
    assert num_to_prune(100, 0.29) == 29  # 100 * 0.29 == 28.999999999999996
    assert num_to_prune(10, 0.5) == 5
    assert num_to_prune(7, 0.5) == 3


def test_target_modules_restrict_what_is_pruned():
    model = tiny_llama()
    before = block_weights(model)
    result = prune(model, "magnitude", 0.5, target_modules=["q_proj", "down_proj"], show_progress=False)
    assert {r.name.rsplit(".", 1)[-1] for r in result.layers} == {"q_proj", "down_proj"}
    for name, w in block_weights(model).items():
        pruned = name.endswith(("q_proj", "down_proj"))
        assert bool(zero_mask(w).any()) == pruned, name
        if not pruned:
            assert torch.equal(w, before[name])
    model = tiny_llama()
    result = prune(model, "magnitude", 0.5, target_modules=r".*\.1\.mlp\..*", show_progress=False)
    assert [r.name for r in result.layers] == [f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def test_embeddings_and_lm_head_stay_dense():
    model = tiny_llama(tie_word_embeddings=False)
    head, embed = model.lm_head.weight.clone(), model.model.embed_tokens.weight.clone()
    prune(model, "magnitude", 0.5, show_progress=False)
    assert torch.equal(model.lm_head.weight, head) and torch.equal(model.model.embed_tokens.weight, embed)


@pytest.mark.parametrize("bad", [-0.1, 0.96, 1.0])
def test_sparsity_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 0.95\]"):
        prune(tiny_llama(), "magnitude", bad, show_progress=False)


@pytest.mark.parametrize("pattern", ["4:2", "2:2", "2-4", "dense", "a:b"])
def test_bad_patterns_are_rejected(pattern):
    with pytest.raises(ValueError, match="pattern|N:M"):
        prune(tiny_llama(), "magnitude", pattern=pattern, show_progress=False)


def test_pattern_a_layer_cannot_hold_names_the_module_and_changes_nothing():
    model = tiny_llama()  # in_features 64 / 128: not divisible by 5
    before = block_weights(model)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*\(64, 64\).*M=5"):
        prune(model, "magnitude", pattern="2:5", show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in block_weights(model).items())


def test_unknown_method_comparison_and_targets():
    with pytest.raises(ValueError, match="method must be one of"):
        prune(tiny_llama(), "random", show_progress=False)
    with pytest.raises(ValueError, match="comparison"):
        prune(tiny_llama(), "magnitude", comparison="column", show_progress=False)
    with pytest.raises(ValueError, match="no linear layer.*nonexistent"):
        prune(tiny_llama(), "magnitude", target_modules=["nonexistent"], show_progress=False)


def test_unsupported_architecture_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="could not find the decoder blocks of Sequential"):
        prune(model, "magnitude", show_progress=False)
