"""`import spp_peft` makes SPP a PEFT method, idempotently, without breaking PEFT's other methods."""

from __future__ import annotations

import importlib

import torch
from peft import LoraConfig, PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

import spp_peft
from spp_peft.tuner import _registration

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_


def test_spp_is_a_real_peft_type_member():
    assert isinstance(PeftType.SPP, PeftType)
    assert PeftType.SPP.value == "SPP" and PeftType("SPP") is PeftType.SPP and PeftType["SPP"] is PeftType.SPP
    assert [m for m in PeftType if m.value == "SPP"] == [PeftType.SPP]
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPP] == "spp_"


def test_import_and_reload_are_idempotent():
    for _ in range(2):
        importlib.reload(_registration)
        importlib.reload(spp_peft)
        spp_peft.tuner._registration.register()
    assert [m for m in PeftType if m.value == "SPP"] == [PeftType.SPP]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPP] is spp_peft.SPPConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPP] is spp_peft.SPPModel
    model = get_peft_model(prune_model_(build("mlp"), "mlp", "2:4"),
                           spp_peft.SPPConfig(target_modules=["lin0"], r=2))
    assert isinstance(model.base_model, spp_peft.SPPModel)


def test_config_round_trips_through_peft_config(tmp_path):
    config = spp_peft.SPPConfig(r=8, spp_alpha=16, target_modules=["q_proj"], spp_dropout=0.05)
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, spp_peft.SPPConfig)
    assert (loaded.r, loaded.spp_alpha, loaded.spp_dropout, loaded.scaling) == (8, 16, 0.05, 2.0)


def test_default_targets_are_all_seven_llama_projections():
    model = get_peft_model(prune_model_(build("llama"), "llama", "2:4"), spp_peft.SPPConfig(r=2))
    targets = {name.rsplit(".", 1)[-1] for name in model.targeted_module_names}
    assert targets == set(MODEL_TARGETS["llama"])


def test_lora_still_works_after_import():
    model = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad():
        assert outputs(model, inputs_for("llama")).shape[-1] == 96


def test_light_modules_import_without_peft_or_the_tuner():
    """`import spp_peft.sparsity` / `spp_peft.pruning` stay light; importing PEFT afterwards registers SPP."""
    import subprocess
    import sys

    script = (
        "import sys, importlib.util\n"
        "import spp_peft.sparsity, spp_peft.pruning\n"
        "assert importlib.util.find_spec('peft') is not None  # a probe imports nothing\n"
        "print(sorted(m for m in ('peft', 'spp_peft.tuner') if m in sys.modules))\n"
        "from peft import PeftType\n"
        "print(PeftType.SPP.value, 'spp_peft.tuner' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert out.split("\n")[:2] == ["[]", "SPP True"]
