"""spp_peft.training.methods: saving an adapter with its record and card, loading it back, merging it."""

from __future__ import annotations

import copy

import pytest
import torch

from spp_peft import training as T

from .helpers import CFG, _randomize


@pytest.mark.parametrize("method", ["spp", "lora_star", "masked_lora"])
def test_saved_adapter_loads_back_to_the_same_merged_model(pruned, tmp_path, method):
    base, _ = pruned
    cfg = T.TrainConfig(**CFG)
    model = T.prepare_model(copy.deepcopy(base), method, cfg)
    _randomize(model)
    T.save_adapter(model, tmp_path, method, cfg, lr=cfg.lr)
    assert T.read_method(tmp_path) == method
    loaded, loaded_method = T.load_trained(copy.deepcopy(base), tmp_path)
    assert loaded_method == method
    a, b = T.merge(model, method), T.merge(loaded, method)
    for (n1, p1), (n2, p2) in zip(a.state_dict().items(), b.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2)


def test_resaving_into_the_same_folder_keeps_each_card_section_once(pruned, tmp_path):
    base, _ = pruned
    cfg = T.TrainConfig(**CFG)
    model = T.prepare_model(copy.deepcopy(base), "spp", cfg)
    for lr in (1e-2, 2e-2):
        T.save_adapter(model, tmp_path, "spp", cfg, lr=lr)
        model.save_pretrained(str(tmp_path))  # PEFT's own save updates the card already in the folder
    card = (tmp_path / "README.md").read_text()
    assert card.count("## SPP adapter") == 1 and card.count("## Training (spp-peft)") == 1
    assert "- lr=0.02," in card and "- lr=0.01," not in card


def test_a_card_section_is_replaced_in_place():
    from spp_peft.hub import replace_section

    card = "# Model\n\n## Training (spp-peft)\n\n- old\n\n## Other\n\nkept\n"
    new = replace_section(card, "## Training (spp-peft)", "## Training (spp-peft)\n\n- new")
    assert new == "# Model\n\n## Training (spp-peft)\n\n- new\n\n## Other\n\nkept\n"
    assert replace_section("# Model\n", "## A", "## A\n\n- a") == "# Model\n\n## A\n\n- a\n"
