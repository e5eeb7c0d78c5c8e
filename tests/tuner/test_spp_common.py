"""The PEFT-style common matrix for SPP: every model kind x every sparsity pattern."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model

from spp_peft import SPPConfig, assert_same_sparsity
from spp_peft.sparsity import sparsity_report, zero_mask

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_


def make(kind, pattern, seed=0, **config):
    base = prune_model_(build(kind, seed), kind, pattern)
    pruned = copy.deepcopy(base)
    config.setdefault("r", 3)  # uneven groups on most layers
    config.setdefault("spp_alpha", 2.0 * config["r"])  # s = 2, the paper's scale
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS[kind], **config))
    return pruned, model


def test_init_is_identity(kind, pattern):
    pruned, model = make(kind, pattern)
    inputs = inputs_for(kind)
    with torch.no_grad():
        assert torch.equal(outputs(model, inputs), outputs(pruned, inputs))


def test_training_changes_only_adapter_weights(kind, pattern):
    pruned, model = make(kind, pattern, init_weights=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("spp_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        outputs(model, inputs_for(kind)).pow(2).mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if "spp_" in name:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    assert_same_sparsity(pruned, model)


@pytest.mark.parametrize("n_adapters", [1, 2])
def test_merge_equals_unmerged_forward_and_keeps_zeros(kind, pattern, n_adapters):
    pruned, model = make(kind, pattern, init_weights=False)
    if n_adapters == 2:
        torch.manual_seed(5)
        model.add_adapter("second", SPPConfig(target_modules=MODEL_TARGETS[kind], r=2, spp_alpha=3.0,
                                              init_weights=False))
        model.base_model.set_adapter(["default", "second"])
    inputs = inputs_for(kind)
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        assert not torch.allclose(unmerged, outputs(pruned, inputs), atol=1e-4), "adapter is a no-op"
        merged_model = model.merge_and_unload()
        merged = outputs(merged_model, inputs)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert type(merged_model) is type(pruned)
    changes = assert_same_sparsity(pruned, merged_model)
    assert changes and all(c.unchanged for c in changes.values())


def test_sequential_merge_is_additive_not_multiplicative(kind):
    """Merging adapter a then b must equal the unmerged forward with a and b active: W (1 + D_a + D_b)."""
    pruned, model = make(kind, "2:4", init_weights=False)
    model.add_adapter("b", SPPConfig(target_modules=MODEL_TARGETS[kind], r=2, init_weights=False))
    model.base_model.set_adapter(["default", "b"])
    inputs = inputs_for(kind)
    with torch.no_grad():
        expected = outputs(model, inputs)
        model.base_model.merge_adapter(["default"])
        model.base_model.merge_adapter(["b"])
        got = outputs(model, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_unmerge_round_trip(kind, pattern):
    pruned, model = make(kind, pattern, init_weights=False)
    originals = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    inputs = inputs_for(kind)
    with torch.no_grad():
        unmerged = outputs(model, inputs)
        model.merge_adapter()
        assert any(not torch.equal(p, originals[n]) for n, p in model.named_parameters() if n in originals)
        model.unmerge_adapter()
        torch.testing.assert_close(outputs(model, inputs), unmerged, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if name in originals:
            torch.testing.assert_close(param, originals[name], rtol=1e-6, atol=1e-7)
            assert torch.equal(zero_mask(param), zero_mask(originals[name])), f"{name}: zero set not restored"


def test_disable_adapter_gives_the_pruned_model(kind, pattern):
    pruned, model = make(kind, pattern, init_weights=False)
    inputs = inputs_for(kind)
    with torch.no_grad():
        adapted = outputs(model, inputs)
        with model.disable_adapter():
            disabled = outputs(model, inputs)
        again = outputs(model, inputs)
        reference = outputs(pruned, inputs)
    assert torch.equal(disabled, reference)
    assert torch.equal(again, adapted)


def test_delete_adapter(kind):
    pruned, model = make(kind, "2:4", init_weights=False)
    inputs = inputs_for(kind)
    with torch.no_grad():
        only_default = outputs(model, inputs)
    model.add_adapter("other", SPPConfig(target_modules=MODEL_TARGETS[kind], r=2, init_weights=False))
    model.base_model.set_adapter(["default", "other"])
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in n for n, _ in model.named_parameters())
    model.delete_adapter("default")
    with torch.no_grad():
        # PeftModel itself needs an adapter to run; the wrapped model runs the bare pruned layers.
        assert torch.equal(outputs(model.base_model.model, inputs), outputs(pruned, inputs))
        assert not torch.equal(only_default, outputs(pruned, inputs))


def test_parameter_count_is_r_n_plus_m(kind):
    _, model = make(kind, "2:4", r=3)
    for name, module in model.named_modules():
        if hasattr(module, "spp_A") and "default" in getattr(module, "spp_A", {}):
            a, b = module.spp_A["default"], module.spp_B["default"]
            assert a.shape == (3, module.in_features) and b.shape == (module.out_features,)
            assert torch.count_nonzero(b) == 0  # zero init: training starts at the pruned model


def test_sparsity_report_sees_through_the_wrapper(kind, pattern):
    pruned, model = make(kind, pattern)
    direct = sparsity_report(pruned, include=MODEL_TARGETS[kind])
    wrapped = sparsity_report(model, include=MODEL_TARGETS[kind])
    assert [l.name for l in direct.layers] == [l.name for l in wrapped.layers]
    assert direct.total_sparsity == pytest.approx(wrapped.total_sparsity)
    expected = {"unstructured50": 0.5, "2:4": 0.5, "4:8": 0.5, "unstructured75": 0.75}[pattern]
    assert direct.total_sparsity == pytest.approx(expected, abs=0.05)


def test_unload_returns_the_untouched_pruned_model(kind):
    pruned, model = make(kind, "2:4", init_weights=False)
    unloaded = model.unload()
    assert not any("spp_" in n for n, _ in unloaded.named_parameters())
    for (name, a), (_, b) in zip(pruned.state_dict().items(), unloaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_exclude_modules_and_layers_to_transform():
    base = prune_model_(build("llama"), "llama", "2:4")
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], exclude_modules=["down_proj"],
                                           layers_to_transform=[1], r=2))
    names = model.targeted_module_names
    assert names and all(".layers.1." in n and not n.endswith("down_proj") for n in names)
    assert len(model.peft_config["default"].base_masks) == len(names) == 6
