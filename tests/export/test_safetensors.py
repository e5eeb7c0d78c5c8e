"""spp_peft.export.safetensors: verification of zero sets and the atomic, verified export."""

from __future__ import annotations

import copy

import pytest
import torch

from spp_peft.export import safetensors as P
from spp_peft.sparsity import SparsityViolation

from .._pipeline_fixtures import one_thread, pruned_tiny  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture()
def pruned_and_merged():
    model, tokenizer, _ = pruned_tiny()
    return model, tokenizer, P.pruned_layers(model)


def test_verify_reports_a_filled_zero(pruned_and_merged):
    model, _, layers = pruned_and_merged
    other = copy.deepcopy(model)
    assert P.verify(model, other, layers)["ok"]
    weight = other.get_submodule(layers[0]).weight
    with torch.no_grad():
        weight[weight == 0] = 1e-3
    check = P.verify(model, other, layers)
    assert not check["ok"] and layers[0] in check["message"]


def test_export_is_atomic_and_refuses_a_broken_model(pruned_and_merged, tmp_path):
    model, tokenizer, layers = pruned_and_merged
    good = P.export_merged(model, tokenizer, tmp_path / "out", model, layers, "spp", "2:4")
    before = (good / "model.safetensors").read_bytes()
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_submodule(layers[-1]).weight.view(-1)[0:4] = 0.5  # fills zeros of a 2:4 group
    with pytest.raises(SparsityViolation):
        P.export_merged(broken, tokenizer, tmp_path / "out", model, layers, "spp", "2:4")
    assert (good / "model.safetensors").read_bytes() == before, "a failed export must leave the old one"
    with pytest.raises(SparsityViolation):
        P.export_merged(broken, tokenizer, tmp_path / "new", model, layers, "spp", "2:4")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no temporary folder may be left behind"
    assert not hasattr(broken.config, P.SPARSITY_CONFIG_KEY)


def test_pruned_layers_ignores_the_tied_padding_row():
    from .._pipeline_fixtures import make_tiny

    model, _ = make_tiny()
    assert bool((model.lm_head.weight == 0).any())  # the padding row of the tied embeddings
    assert P.pruned_layers(model) == []
