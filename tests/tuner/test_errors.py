"""Bad input gets a clear error naming the module, shape or value, and nothing is lost."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model

from spp_peft import SPPConfig, SparsityViolation

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"spp_dropout": 1.5}, "spp_dropout must be in"),
        ({"bias": "lora_only"}, "bias must be"),
        ({"sparsity_check": "loose"}, "sparsity_check must be one of"),
        ({"chunk_rows": 0}, "chunk_rows must be"),
        ({"target_modules": ".*proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SPPConfig(**kwargs)


def test_r_larger_than_out_features_names_the_module():
    model = prune_model_(build("mlp"), "mlp", "2:4")
    with pytest.raises(ValueError, match=r"r=9 is invalid for module 'lin2' with out_features=8"):
        get_peft_model(model, SPPConfig(target_modules=["lin2"], r=9))


def test_non_linear_target_names_the_module():
    model = build("llama")
    with pytest.raises((TypeError, ValueError), match="embed_tokens"):
        get_peft_model(model, SPPConfig(target_modules=["embed_tokens"], r=2))


def _adapter_with_factor_zero_in_row(kind="mlp", mode="strict"):
    """An adapter whose factor 1 + s*B[j]*A[g(j), k] is exactly 0 somewhere, so merging creates new zeros."""
    model = prune_model_(build(kind), kind, "2:4")
    peft_model = get_peft_model(model, SPPConfig(target_modules=["lin0"], r=1, spp_alpha=1.0,
                                                 sparsity_check=mode))
    layer = peft_model.base_model.model.lin0
    with torch.no_grad():
        layer.spp_A["default"].fill_(1.0)
        layer.spp_B["default"].zero_()
        layer.spp_B["default"][3] = -1.0  # factor of row 3 = 1 + 1 * (-1) * 1 = 0
    return peft_model, layer


def test_strict_merge_refuses_new_zeros_and_leaves_weight_untouched():
    peft_model, layer = _adapter_with_factor_zero_in_row()
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(SparsityViolation, match=r"merge of module 'lin0' turned \d+ non-zero weight\(s\) into exact zeros"):
        peft_model.merge_adapter()
    assert torch.equal(layer.get_base_layer().weight, weight)
    assert not layer.merged


def test_warn_mode_merges_and_reports_new_zeros():
    peft_model, layer = _adapter_with_factor_zero_in_row(mode="warn")
    with pytest.warns(UserWarning, match="exact zeros"):
        peft_model.merge_adapter()
    assert layer.merged
    assert torch.count_nonzero(layer.get_base_layer().weight[3]) == 0
    with pytest.warns(UserWarning, match="cannot be restored"):
        peft_model.unmerge_adapter()


def test_safe_merge_refuses_non_finite_weights():
    model = prune_model_(build("mlp"), "mlp", "2:4")
    peft_model = get_peft_model(model, SPPConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False))
    layer = peft_model.base_model.model.lin1
    with torch.no_grad():
        layer.spp_B["default"][0] = float("nan")
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "base_layer" in n}
    with pytest.raises(ValueError, match="merge of module 'lin1' produced non-finite weights"):
        peft_model.merge_and_unload(safe_merge=True)
    layer_weight = layer.get_base_layer().weight
    assert torch.equal(layer_weight, before["base_model.model.lin1.base_layer.weight"])


def test_filled_zero_is_always_an_error_even_in_warn_mode():
    """A filled zero cannot come from SPP's maths; simulate a corrupted merge to check the guard."""
    from spp_peft.sparsity import compare_zero_sets, enforce_zero_set, zero_mask

    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    corrupted = torch.tensor([[0.5, 1.0], [2.0, 0.0]])
    change = compare_zero_sets(zero_mask(weight), corrupted)
    assert change.filled == 1 and change.new_zeros == 0
    with pytest.raises(SparsityViolation, match="module 'x' turned 1 zero weight"):
        enforce_zero_set("x", change, "warn", "merge")
    assert enforce_zero_set("x", change, "off", "merge") is None


def test_dense_targets_warn():
    with pytest.warns(UserWarning, match=r"have no zero weight \(first: 'lin0'\)"):
        get_peft_model(build("mlp"), SPPConfig(target_modules=["lin0"], r=2))


def test_mixed_batch_adapter_names():
    model = prune_model_(build("llama"), "llama", "2:4")
    peft_model = get_peft_model(model, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=2, init_weights=False))
    peft_model.add_adapter("other", SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, init_weights=False))
    peft_model.eval()
    inputs = inputs_for("llama", batch=3)
    ids = inputs["input_ids"]
    with torch.no_grad():
        mixed = peft_model(input_ids=ids, adapter_names=["default", "other", "__base__"]).logits
        peft_model.set_adapter("default")
        only_default = peft_model(input_ids=ids).logits
        peft_model.set_adapter("other")
        only_other = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], only_default[0])
    torch.testing.assert_close(mixed[1], only_other[1])
    torch.testing.assert_close(mixed[2], base[2])
    with pytest.raises(ValueError, match="non-existing adapter"):
        peft_model(input_ids=ids, adapter_names=["default", "typo", "__base__"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs"):
        peft_model(input_ids=ids, adapter_names=["default"])
    peft_model.train()
    with pytest.raises(ValueError, match="training mode"):
        peft_model(input_ids=ids, adapter_names=["default", "other", "__base__"])
