"""spp_peft.training.baselines: masked LoRA (SQFT's SparsePEFT) and LoRA*, and the merge of every method."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from spp_peft import training as T
from spp_peft.sparsity import SparsityViolation, assert_same_sparsity

from .helpers import CFG, _lora_layers, _randomize

# -------------------------------------------------------------------------------------- masked LoRA


def test_masked_lora_forward_is_w_plus_masked_update(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    name, layer = next(iter(_lora_layers(model).items()))
    weight = layer.get_base_layer().weight.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    scale = layer.scaling["default"]
    assert scale == 2.0
    x = torch.randn(3, 5, weight.shape[1])
    keep = weight != 0
    expected = F.linear(x, weight + scale * (b @ a) * keep)
    unmasked = F.linear(x, weight + scale * (b @ a))
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unmasked, atol=1e-3), "the mask must change the output"


def test_masked_lora_gradient_matches_explicit_formula(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    layer = next(iter(_lora_layers(model).values()))
    weight = layer.get_base_layer().weight.detach()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(4, weight.shape[1])
    layer(x).pow(2).sum().backward()
    a2, b2 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    F.linear(x, weight + 2.0 * (b2 @ a2) * (weight != 0)).pow(2).sum().backward()
    torch.testing.assert_close(a.grad, a2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-4, atol=1e-5)


def test_masked_lora_merge_equals_forward_and_unmerge_restores(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "masked_lora", T.TrainConfig(**CFG))
    _randomize(model)
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        after = model(input_ids=ids).logits
    torch.testing.assert_close(merged, before, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    for layer in _lora_layers(model).values():  # unmerge gives back the pruned zeros exactly
        assert torch.equal(layer.get_base_layer().weight == 0, ~getattr(layer, T.MASK_BUFFER))


# ------------------------------------------------------------------------------------ merge per method


@pytest.mark.parametrize("method", ["spp", "lora_star", "masked_lora"])
def test_merge_keeps_the_pruned_zero_set(pruned, method):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), method, T.TrainConfig(**CFG))
    _randomize(model)
    merged = T.merge(model, method)
    assert_same_sparsity(base, merged)
    changed = sum(int((w1 != w0).sum()) for (w0, w1) in zip(
        [m.weight for m in base.modules() if isinstance(m, torch.nn.Linear)],
        [m.weight for m in merged.modules() if isinstance(m, torch.nn.Linear)]))
    assert changed > 0, "the adapter must have changed the weights"


def test_lora_star_is_the_remasked_lora_merge(pruned):
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "lora_star", T.TrainConfig(**CFG))
    _randomize(model)
    name, layer = next(iter(_lora_layers(model).items()))
    key = name.removeprefix("base_model.model.")
    w = layer.get_base_layer().weight.detach().clone()
    delta = layer.get_delta_weight("default").detach()
    merged = T.merge(model, "lora_star")
    torch.testing.assert_close(merged.get_submodule(key).weight, (w + delta) * (w != 0))


def test_plain_lora_merge_fills_zeros(pruned):
    """The control: without the re-mask, a LoRA merge breaks the sparsity (what LoRA* and SPP avoid)."""
    base, _ = pruned
    model = T.prepare_model(copy.deepcopy(base), "lora_star", T.TrainConfig(**CFG))
    _randomize(model)
    with pytest.raises(SparsityViolation, match="zero weight"):
        assert_same_sparsity(base, model.merge_and_unload())


def test_none_method_is_the_model_itself(pruned):
    base, _ = pruned
    assert T.prepare_model(base, "none", T.TrainConfig(**CFG)) is base
    assert T.merge(base, "none") is base
    with pytest.raises(ValueError, match="unknown fine-tuning method"):
        T.prepare_model(base, "qlora", T.TrainConfig(**CFG))
