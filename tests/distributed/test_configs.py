"""The shipped accelerate / DeepSpeed recipes parse, say what they claim, and the ZeRO-3 helper marks SPP layers."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import pytest

import spp_peft
from spp_peft.distributed import prepare_zero3

ROOT = Path(__file__).resolve().parent.parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


def _load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(CONFIGS / name))


def test_ddp_config():
    config = _load("ddp.yaml")
    assert config.distributed_type.value == "MULTI_GPU" and config.mixed_precision == "bf16"


def test_ddp_cpu_config_launches_two_processes_through_torchrun():
    """MULTI_GPU is what makes `accelerate launch` start several local processes (torchrun); MULTI_CPU would
    start one without mpirun. The launch itself is tested in test_accelerate_launch.py."""
    config = _load("ddp_cpu.yaml")
    assert config.distributed_type.value == "MULTI_GPU" and config.num_processes == 2
    assert config.use_cpu is True and config.mixed_precision == "no" and config.num_machines == 1


def test_fsdp_config_is_fsdp2_with_block_wrapping():
    config = _load("fsdp.yaml")
    assert config.distributed_type.value == "FSDP"
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_zero3_config_points_to_a_stage3_deepspeed_file():
    config = _load("zero3.yaml")
    assert config.distributed_type.value == "DEEPSPEED"
    ds_file = ROOT / config.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())
    assert ds["zero_optimization"]["stage"] == 3
    assert config.deepspeed_config["zero3_init_flag"] is False  # SPP records masks from the real weights


def test_prepare_zero3_marks_spp_layers(monkeypatch):
    # Imported before deepspeed is faked: importing peft probes for deepspeed (find_spec), which a fake
    # module without a spec breaks.
    from peft import get_peft_model

    from spp_peft.testing import tiny_llama

    calls = []

    def set_z3_leaf_modules(model, classes):
        calls.append(classes)
        return [m for m in model.modules() if type(m) in classes]

    fake = types.ModuleType("deepspeed")
    fake.utils = types.ModuleType("deepspeed.utils")
    fake.utils.set_z3_leaf_modules = set_z3_leaf_modules
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake.utils)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_llama(), spp_peft.SPPConfig(r=4, spp_alpha=8, target_modules=["q_proj", "v_proj"]))
    marked = prepare_zero3(model)
    assert calls == [[spp_peft.tuner.layer.Linear]] and len(marked) == 4
    with pytest.raises(ValueError, match="no SPP layer"):
        prepare_zero3(tiny_llama())


def test_prepare_zero3_without_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", None)
    with pytest.raises(ImportError, match=r"spp-peft\[deepspeed\]"):
        prepare_zero3(None)
