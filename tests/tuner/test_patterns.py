"""rank_pattern / alpha_pattern, as LoRA's: per-module r and spp_alpha, saved and loaded with the adapter."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model

from spp_peft import SPPConfig

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_


def _base():
    return prune_model_(build("llama"), "llama", "2:4")


def test_rank_pattern_lets_r_exceed_the_narrow_gqa_projections(tmp_path):
    # q_proj has 64 output rows, k_proj / v_proj 32 (GQA): r=48 fits only with a pattern for k and v.
    with pytest.raises(ValueError, match="rank_pattern"):
        get_peft_model(_base(), SPPConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=48))
    config = SPPConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=48, rank_pattern={"k_proj": 16, "v_proj": 8},
                       alpha_pattern={"v_proj": 4.0}, init_weights=False)
    model = get_peft_model(_base(), config)
    attn = model.base_model.model.model.layers[0].self_attn
    assert (attn.q_proj.r["default"], attn.k_proj.r["default"], attn.v_proj.r["default"]) == (48, 16, 8)
    assert attn.q_proj.scaling["default"] == pytest.approx(32 / 48)
    assert attn.v_proj.scaling["default"] == pytest.approx(4 / 8)
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(outputs(loaded, inputs), expected)


@pytest.mark.parametrize("field, value", [("rank_pattern", {"k_proj": 0}), ("alpha_pattern", {"k_proj": float("nan")})])
def test_bad_pattern_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SPPConfig(target_modules=MODEL_TARGETS["llama"], **{field: value})
