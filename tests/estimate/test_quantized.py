"""spp-peft estimate on quantized bases: the weights' bytes against a real bitsandbytes model, the
dequantized temporary, what is refused, and the CLI (--quantization 4bit/8bit)."""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch

from spp_peft.estimate import add_estimate_arguments, estimate_memory, run_estimate

from .test_estimate import TINY

pytest.importorskip("bitsandbytes")


def _stored_bytes(model) -> int:
    """Every parameter and buffer, plus bitsandbytes' scales (the 4-bit quant state, the 8-bit row scales)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    seen = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors = [state.absmax, *((state.state2.absmax, state.state2.code, state.offset) if state.nested else ())]
            total += sum(t.numel() * t.element_size() for t in tensors)
        scb = getattr(p, "SCB", None)
        if scb is not None:
            total += scb.numel() * scb.element_size()
    return total - sum(b.numel() * b.element_size() for b in model.buffers())  # rotary tables are not weights


def _quantized_tiny(tmp_path, **bnb):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    data = dict(TINY)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu",
                                                    quantization_config=BitsAndBytesConfig(**bnb))


@pytest.mark.parametrize("kind, bnb", [
    ("4bit", dict(load_in_4bit=True)),
    ("4bit-dq", dict(load_in_4bit=True, bnb_4bit_use_double_quant=True)),
    ("8bit", dict(load_in_8bit=True)),
])
def test_weight_bytes_match_a_real_bitsandbytes_model(tmp_path, kind, bnb):
    model = _quantized_tiny(tmp_path, **bnb)
    est = estimate_memory(dict(TINY), method="spp", dtype="float32", quantization=kind[:4],
                          double_quant=kind.endswith("dq"))
    measured = _stored_bytes(model)
    assert est.components["weights"] == pytest.approx(measured, rel=0.002)


def test_quantized_weights_are_smaller_and_the_temporary_is_counted():
    full = estimate_memory("smollm2", method="spp", dtype="bfloat16")
    four = estimate_memory("smollm2", method="spp", dtype="bfloat16", quantization="4bit")
    eight = estimate_memory("smollm2", method="lora", dtype="bfloat16", quantization="8bit")
    assert four.components["weights"] < eight.components["weights"] < full.components["weights"]
    assert "dequantized weight" not in full.components
    largest = 576 * 1536  # SmolLM2's MLP projections
    assert four.components["dequantized weight"] == 2 * largest == eight.components["dequantized weight"]
    assert four.settings["quantization"] == "4bit" and "autocast weight copies" not in four.components


@pytest.mark.parametrize("kwargs", [dict(method="full"), dict(devices=2, sharding="fsdp")])
def test_quantization_is_for_adapters_on_unsharded_devices(kwargs):
    with pytest.raises(ValueError, match="quantization='4bit' is for adapters"):
        estimate_memory("smollm2", quantization="4bit", **kwargs)


def test_cli_quantization(capsys):
    parser = argparse.ArgumentParser()
    add_estimate_arguments(parser)
    assert run_estimate(parser.parse_args(["--quantization", "4bit", "--double-quant", "--seq-len", "128"])) == 0
    out = capsys.readouterr().out
    assert "4bit double-quant block linears" in out and "dequantized weight" in out and "full FT" not in out
    assert run_estimate(parser.parse_args(["--quantization", "8bit", "--json", "--method", "spp"])) == 0
    assert json.loads(capsys.readouterr().out)[0]["settings"]["quantization"] == "8bit"
