"""The zero guarantee against bad adapter files, refused merges and bad configs (issue 9).

Every refusal must leave the model exactly as it was: same modules, weights bit for bit, every adapter tensor.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import spp_peft
from spp_peft import SPPConfig, SparsityViolation
from spp_peft.tuner import AdapterFileError

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_

Q_PROJ = "model.layers.0.self_attn.q_proj"


def saved_adapter(tmp_path, pattern="2:4", **config):
    """A pruned tiny Llama and an SPP adapter with non-trivial weights saved for it."""
    base = prune_model_(build("llama"), "llama", pattern)
    kwargs = dict(target_modules=MODEL_TARGETS["llama"], r=4, spp_alpha=8, init_weights=False)
    model = get_peft_model(base, SPPConfig(**{**kwargs, **config}))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def fresh_base(pattern="2:4", seed=0):
    return prune_model_(build("llama", seed), "llama", pattern)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert set(after) == set(before)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def edit_weights(path, edit):
    weights = load_file(path / "adapter_model.safetensors")
    edit(weights)
    save_file(weights, path / "adapter_model.safetensors")


def edit_config(path, edit):
    config = json.loads((path / "adapter_config.json").read_text())
    edit(config)
    (path / "adapter_config.json").write_text(json.dumps(config))


def load_with(loader, base, path, **kwargs):
    if loader == "peft":
        return PeftModel.from_pretrained(base, path, **kwargs)
    if loader == "spp":
        return spp_peft.load_adapter(base, str(path), **kwargs)
    base.load_adapter(str(path), adapter_name="default", **kwargs)
    return base


LOADERS = ["peft", "spp", "transformers"]


# ------------------------------------------------------------------ 1. adapter files touch only adapters


@pytest.mark.parametrize("loader", LOADERS)
def test_adapter_file_holding_a_base_weight_is_refused(tmp_path, loader):
    path = saved_adapter(tmp_path)
    key = f"base_model.model.{Q_PROJ}.base_layer.weight"
    edit_weights(path, lambda w: w.__setitem__(key, torch.randn(64, 64)))
    base = fresh_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match=r"q_proj\.base_layer\.weight"):
        load_with(loader, base, path)
    assert not any("spp_" in n for n in base.state_dict())
    assert_same_state(base, before)


@pytest.mark.parametrize("loader", LOADERS)
def test_adapter_missing_a_tensor_is_refused(tmp_path, loader):
    path = saved_adapter(tmp_path)
    key = f"base_model.model.{Q_PROJ}.spp_B"
    edit_weights(path, lambda w: w.pop(key))
    base = fresh_base()
    before = snapshot(base)
    with pytest.raises(AdapterFileError, match=r"q_proj\.spp_B"):
        load_with(loader, base, path)
    assert_same_state(base, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_adapter_with_non_finite_values_is_refused(tmp_path, bad):
    path = saved_adapter(tmp_path)
    key = f"base_model.model.{Q_PROJ}.spp_A"
    edit_weights(path, lambda w: w[key].view(-1).__setitem__(3, bad))
    base = fresh_base()
    with pytest.raises(AdapterFileError, match=r"q_proj\.spp_A.*non-finite"):
        PeftModel.from_pretrained(base, path)
    assert not any("spp_" in n for n in base.state_dict())


def test_adapter_with_a_wrong_shape_or_dtype_is_refused(tmp_path):
    path = saved_adapter(tmp_path)
    key = f"base_model.model.{Q_PROJ}.spp_A"
    edit_weights(path, lambda w: w.__setitem__(key, w[key][:, :-1].contiguous()))
    with pytest.raises(AdapterFileError, match=r"q_proj\.spp_A.*shape"):
        PeftModel.from_pretrained(fresh_base(), path)
    edit_weights(path, lambda w: w.__setitem__(key, torch.ones(4, 64, dtype=torch.int32)))
    with pytest.raises(AdapterFileError, match=r"q_proj\.spp_A.*dtype"):
        PeftModel.from_pretrained(fresh_base(), path)


def test_a_base_weight_with_another_mask_loaded_later_is_caught_at_merge(tmp_path):
    """Whatever path overwrote a base weight after injection, merging verifies the recorded mask first."""
    model = get_peft_model(fresh_base(), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, init_weights=False))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)  # densified behind the adapter's back
    before = snapshot(model)
    with pytest.raises(SparsityViolation, match=r"q_proj.*changed since"):
        model.merge_and_unload()
    assert_same_state(model, before)


# ------------------------------------------------------------------ 2. merges are all-or-nothing


def _break_last_layer(model, how):
    layer = model.base_model.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        if how == "nan":
            layer.spp_B["default"][0] = float("nan")
        else:  # a factor of exactly 0 on a non-zero weight: 1 + s * B[0] * A[0, k] == 0
            w = layer.base_layer.weight
            k = int(torch.nonzero(w[0]).flatten()[0])
            layer.spp_B["default"][0] = 1.0
            layer.spp_A["default"][0, k] = -1.0 / layer.scaling["default"]
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("how", ["zero", "nan"])
def test_refused_merge_and_unload_leaves_the_model_as_it_was(how, dtype):
    model = get_peft_model(fresh_base().to(dtype), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4,
                                                             init_weights=False))
    _break_last_layer(model, how)
    before = snapshot(model)
    expected = (SparsityViolation, ValueError)
    with pytest.raises(expected, match="down_proj"):
        model.merge_and_unload(safe_merge=True)
    assert isinstance(model, PeftModel)
    assert len(model.base_model.spp_layers()) == 14
    assert not any(layer.merged for layer in model.base_model.spp_layers().values())
    assert_same_state(model, before)


def test_refused_merge_adapter_and_unmerge_adapter_are_all_or_nothing():
    model = get_peft_model(fresh_base(), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, init_weights=False))
    _break_last_layer(model, "zero")
    before = snapshot(model)
    with pytest.raises(SparsityViolation, match="down_proj"):
        model.merge_adapter()
    assert not any(layer.merged for layer in model.base_model.spp_layers().values())
    assert_same_state(model, before)
    # a sound merge (factor 0.5 instead of 0), then a factor that makes unmerging impossible in the last layer
    last = model.base_model.model.model.layers[-1].mlp.down_proj
    with torch.no_grad():
        last.spp_B["default"][0] = 0.5
    model.merge_adapter()
    with torch.no_grad():
        last.spp_B["default"][0] = float("nan")
    merged = snapshot(model)
    with pytest.raises(SparsityViolation, match="down_proj"):
        model.unmerge_adapter()
    assert all(layer.merged for layer in model.base_model.spp_layers().values())
    assert_same_state(model, merged)


# ------------------------------------------------------------------ 3. the loader decides what is checked


@pytest.mark.parametrize("loader", LOADERS)
def test_empty_mask_record_in_the_file_does_not_skip_the_check(tmp_path, loader):
    path = saved_adapter(tmp_path)
    edit_config(path, lambda c: c.update(base_masks={}, verify_base_masks=False))
    other = fresh_base("4:8")
    before = snapshot(other)
    with pytest.raises(SparsityViolation, match=r"q_proj.*no recorded mask"):
        load_with(loader, other, path)
    assert_same_state(other, before)


@pytest.mark.parametrize("loader", LOADERS)
def test_file_cannot_switch_verification_off(tmp_path, loader):
    path = saved_adapter(tmp_path)
    edit_config(path, lambda c: c.update(verify_base_masks=False))
    other = fresh_base("4:8")
    before = snapshot(other)
    with pytest.raises(SparsityViolation, match=r"spp_peft\.load_adapter\(.*verify_base_masks=False"):
        load_with(loader, other, path)
    assert_same_state(other, before)


def test_one_missing_record_names_the_module(tmp_path):
    path = saved_adapter(tmp_path)
    edit_config(path, lambda c: c["base_masks"].pop(Q_PROJ))
    with pytest.raises(SparsityViolation, match=r"'model\.layers\.0\.self_attn\.q_proj'.*no recorded mask"):
        PeftModel.from_pretrained(fresh_base(), path)


def test_adapter_without_any_record_loads_with_a_loud_warning(tmp_path):
    """Adapters saved before fingerprints existed: no record at all. Loaded, but never silently."""
    path = saved_adapter(tmp_path)
    edit_config(path, lambda c: c.pop("base_masks"))
    with pytest.warns(UserWarning, match=r"no record of the zero masks.*cannot be verified"):
        model = PeftModel.from_pretrained(fresh_base(), path)
    assert len(model.base_model.spp_layers()) == 14


def test_the_loader_override_loads_and_records_the_new_base(tmp_path):
    path = saved_adapter(tmp_path)
    other = fresh_base("4:8")
    model = spp_peft.load_adapter(other, str(path), verify_base_masks=False)
    assert model.peft_config["default"].base_masks[Q_PROJ]["pattern"] == "4:8"
    model.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text()).get("verify_base_masks") is None
    PeftModel.from_pretrained(fresh_base("4:8"), tmp_path / "again")  # now matches its base


# ------------------------------------------------------------------ 4. bad targets touch nothing


@pytest.mark.parametrize(
    "config, match",
    [
        ({"target_modules": ["q_proj", "input_layernorm"]}, r"input_layernorm.*LlamaRMSNorm"),
        ({"target_modules": ["q_proj", "k_proj"], "r": 48}, r"r=48.*k_proj.*out_features=32"),
    ],
)
def test_bad_targets_are_refused_before_any_module_is_replaced(config, match):
    base = fresh_base()
    before = snapshot(base)
    modules = {n: type(m) for n, m in base.named_modules()}
    with pytest.raises(ValueError, match=match):
        get_peft_model(base, SPPConfig(**config))
    assert {n: type(m) for n, m in base.named_modules()} == modules
    assert_same_state(base, before)


def test_unsupported_module_types_raise_value_error():
    with pytest.raises(ValueError, match="Embedding"):
        get_peft_model(fresh_base(), SPPConfig(target_modules=["embed_tokens"]))


# ------------------------------------------------------------------ 5. a config is reusable


def test_one_config_serves_two_differently_pruned_models():
    config = SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4)
    first = get_peft_model(fresh_base("2:4"), config)
    second = get_peft_model(fresh_base("4:8", seed=1), config)
    assert config.base_masks is None  # the caller's config keeps its meaning
    assert first.peft_config["default"].base_masks[Q_PROJ]["pattern"] == "2:4"
    assert second.peft_config["default"].base_masks[Q_PROJ]["pattern"] == "4:8"


# ------------------------------------------------------------------ 8. config values


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), 1e40])
def test_non_finite_or_huge_alpha_is_refused(alpha):
    with pytest.raises(ValueError, match="spp_alpha"):
        SPPConfig(spp_alpha=alpha)


# ------------------------------------------------------------------ 12. per-adapter policy, PEFT wording


def test_sparsity_check_is_kept_per_adapter():
    model = get_peft_model(fresh_base(), SPPConfig(target_modules=["q_proj"], r=4, sparsity_check="strict"))
    model.add_adapter("loose", SPPConfig(target_modules=["q_proj"], r=4, sparsity_check="off"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.sparsity_check == {"default": "strict", "loose": "off"}


def test_mixed_batch_on_merged_adapters_uses_peft_wording():
    model = get_peft_model(fresh_base(), SPPConfig(target_modules=["q_proj"], r=4, init_weights=False)).eval()
    model.merge_adapter()
    inputs = inputs_for("llama")
    with pytest.raises(ValueError, match=r"please call `unmerge_adapter` first"):
        model(**inputs, adapter_names=["default"] * 3)


def test_a_loaded_adapter_still_gives_the_saved_outputs(tmp_path):
    """The guards do not get in the way of a sound adapter (all three loaders)."""
    base = fresh_base()
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, init_weights=False))
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    for loader in LOADERS:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            loaded = load_with(loader, fresh_base(), tmp_path / "adapter")
        with torch.no_grad():
            assert torch.equal(outputs(loaded, inputs), expected), loader
    assert math.isfinite(float(expected.abs().max()))
