"""spp_peft.estimate.settings: one dataclass for every input, its checks, and the CLI flags generated from it;
target matching with PEFT's semantics on full module names."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

import pytest
import torch

from spp_peft.estimate import EstimateSettings, add_estimate_arguments, estimate_memory, settings_from_args


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_estimate_arguments(parser)
    return parser.parse_args(argv)


def test_every_field_has_a_flag_with_help():
    parser = argparse.ArgumentParser()
    add_estimate_arguments(parser)
    flags = {opt: action for action in parser._actions for opt in action.option_strings}
    for spec in fields(EstimateSettings):
        action = flags["--" + spec.name.replace("_", "-")]
        assert action.help == spec.metadata["help"]
    assert isinstance(flags["--gradient-checkpointing"], argparse._StoreTrueAction)


def test_flags_become_settings():
    args = _parse(["--method", "lora", "--chunk-rows", "8", "--overhead-gib", "1.5", "--gradient-checkpointing",
                   "--target-modules", "q_proj, v_proj", "--compute-dtype", "bf16", "--dtype", "fp32"])
    (one,) = settings_from_args(args)
    assert one.method == "lora" and one.chunk_rows == 8 and one.overhead_gib == 1.5 and one.gradient_checkpointing
    assert one.target_modules == ["q_proj", "v_proj"]
    assert one.dtype == torch.float32 and one.compute_torch_dtype == torch.bfloat16
    assert [s.method for s in settings_from_args(_parse([]))] == ["spp", "lora", "full"]


def test_defaults_match_the_keyword_form():
    defaults = EstimateSettings()
    assert defaults.compute_torch_dtype == defaults.dtype == torch.bfloat16 and defaults.shards == 1
    # compute_dtype=None follows dtype, also after replace()
    assert replace(defaults, dtype="float32").compute_torch_dtype == torch.float32


@pytest.mark.parametrize("kwargs,message", [
    (dict(optimizer="lion"), "optimizer must be one of"),
    (dict(attention="flash"), "attention must be one of"),
    (dict(seq_len=0), "seq_len must be a positive integer"),
    (dict(r=2.5), "r must be a positive integer"),
    (dict(overhead_gib="1"), "overhead_gib must be a finite number"),
    (dict(compute_dtype="int4"), "unknown dtype"),
])
def test_settings_refuse_nonsense(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EstimateSettings(**kwargs)


def test_settings_object_and_keywords_agree():
    settings = EstimateSettings("smollm2", method="lora", batch_size=2, seq_len=64)
    assert estimate_memory(settings).to_dict() == estimate_memory("smollm2", method="lora", batch_size=2,
                                                                  seq_len=64).to_dict()
    assert estimate_memory(settings, seq_len=128).settings["seq_len"] == 128


def test_targets_follow_peft_semantics():
    def targets(value):
        return estimate_memory("smollm2", target_modules=value, seq_len=8).settings["targets"]

    assert targets(r"model\.layers\.\d+\.self_attn\.(q|v)_proj") == 60  # a regex over whole names
    assert targets(["layers.0.mlp.down_proj"]) == 1  # a dotted suffix of the full name
    assert targets("all-linear") == 30 * 7
    with pytest.raises(ValueError, match="match no linear layer"):
        targets("q_proj")  # a string must match the whole name
