"""Fuzzing saved adapters: random deletions and edits of tensors (keys, shapes, dtypes, values) and of config
fields. Every case must end in a clear error that leaves the base untouched, or in a correct load: factors equal
to the file's and a merge that keeps exactly the base's zeros."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import spp_peft
from spp_peft import SPPConfig, SparsityViolation
from spp_peft.sparsity import assert_same_sparsity

from .conftest import MODEL_TARGETS, build, prune_model_

# Errors a bad file may end in: each is one message naming what is wrong.
CLEAR_ERRORS = (spp_peft.AdapterFileError, SparsityViolation, ValueError, TypeError, KeyError)


def _base():
    return prune_model_(build("llama"), "llama", "2:4")


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "adapter"
    model = get_peft_model(_base(), SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, spp_alpha=8,
                                              init_weights=False))
    model.save_pretrained(path)
    return path


def _tensor_edit(weights: dict, op: str, index: int) -> None:
    keys = sorted(weights)
    key = keys[index % len(keys)]
    if op == "delete":
        del weights[key]
    elif op == "foreign":
        weights[key.replace(".spp_A", ".base_layer.weight").replace(".spp_B", ".base_layer.bias")] = torch.ones(64, 64)
    elif op == "shape":
        weights[key] = weights[key].flatten()[1:].contiguous()
    elif op in ("int", "fp16", "bf16"):
        dtype = {"int": torch.int32, "fp16": torch.float16, "bf16": torch.bfloat16}[op]
        weights[key] = weights[key].to(dtype)
    elif op in ("nan", "inf"):
        weights[key] = weights[key].clone()
        weights[key].view(-1)[0] = float(op)


def _config_edit(config: dict, op: str, value) -> None:
    if op == "drop_record":
        config["base_masks"].pop(sorted(config["base_masks"])[value % len(config["base_masks"])])
    elif op == "fingerprint":
        name = sorted(config["base_masks"])[value % len(config["base_masks"])]
        config["base_masks"][name]["fingerprint"] = "0" * 32
    elif op == "garble_record":
        name = sorted(config["base_masks"])[value % len(config["base_masks"])]
        config["base_masks"][name] = {"shape": "x"}
    elif op in ("r", "spp_alpha", "bias", "target_modules", "verify_base_masks", "peft_type", "base_masks"):
        config[op] = value


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 80), st.floats(allow_nan=True),
                          st.sampled_from(["all", "none", "q_proj", ["q_proj"], [], {}, "LORA"]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(
    tensor_ops=st.lists(st.tuples(st.sampled_from(["none", "delete", "foreign", "shape", "int", "fp16", "bf16",
                                                   "nan", "inf"]), st.integers(0, 27)), max_size=2),
    config_op=st.sampled_from(["none", "drop_record", "fingerprint", "garble_record", "r", "spp_alpha", "bias",
                               "target_modules", "verify_base_masks", "peft_type", "base_masks"]),
    config_value=CONFIG_VALUES,
    loader=st.sampled_from(["peft", "spp", "transformers"]),
)
def test_a_mangled_adapter_is_refused_cleanly_or_loaded_correctly(good_adapter, tmp_path_factory, tensor_ops,
                                                                  config_op, config_value, loader):
    path = tmp_path_factory.mktemp("case") / "adapter"
    shutil.copytree(good_adapter, path)
    weights = load_file(path / "adapter_model.safetensors")
    for op, index in tensor_ops:
        _tensor_edit(weights, op, index)
    save_file(weights, path / "adapter_model.safetensors")
    config = json.loads((path / "adapter_config.json").read_text())
    _config_edit(config, config_op, config_value if config_op not in ("drop_record", "fingerprint", "garble_record")
                 else 3)
    (path / "adapter_config.json").write_text(json.dumps(config))

    base = _base()
    reference = _base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    try:
        if loader == "peft":
            model = PeftModel.from_pretrained(base, path)
        elif loader == "spp":
            model = spp_peft.load_adapter(base, str(path))
        else:
            base.load_adapter(str(path), adapter_name="default")
            model = base
    except CLEAR_ERRORS as err:
        assert str(err)
        assert not any("spp_" in k for k in base.state_dict())
        after = base.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
        return
    # A load that succeeded is a correct one: the file's factors, finite, and the base's zeros kept by a merge.
    loaded = {k: v for k, v in model.state_dict().items() if ".spp_" in k}
    assert loaded and all(torch.isfinite(v).all() for v in loaded.values())
    for key, value in weights.items():
        model_key = key.removeprefix("base_model.model.") + ".default"
        match = [v for k, v in loaded.items() if k.endswith(model_key)]
        assert match and torch.equal(match[0], value.to(match[0].dtype)), key
    merged = model.merge_and_unload() if loader != "transformers" else None
    if merged is not None:
        assert_same_sparsity(reference, merged)
