"""Saving and loading SPP adapters: PeftModel.from_pretrained (also in a fresh process), transformers'
load_adapter, the model card, and the mask fingerprints that guard against loading onto the wrong base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model

import spp_peft
from spp_peft import SPPConfig, SparsityViolation

from .conftest import MODEL_TARGETS, build, inputs_for, outputs, prune_model_

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def trained_llama(tmp_path, pattern="2:4"):
    """A pruned tiny Llama saved to disk, an SPP adapter with non-trivial weights saved next to it."""
    base = prune_model_(build("llama"), "llama", pattern)
    base.config.spp_pruning = {"method": "magnitude", "sparsity": 0.5, "pattern": pattern}
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, spp_alpha=8,
                                           init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    return model


def test_adapter_files_and_config(tmp_path):
    trained_llama(tmp_path)
    files = set(os.listdir(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPP" and config["r"] == 4
    masks = config["base_masks"]
    assert len(masks) == 2 * 7  # 2 layers x 7 projections
    assert {rec["pattern"] for rec in masks.values()} == {"2:4"}
    assert all(rec["sparsity"] == pytest.approx(0.5) for rec in masks.values())
    assert config["base_pruning"]["method"] == "magnitude"
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and all(".spp_A" in k or ".spp_B" in k for k in weights)


def test_model_card_describes_the_sparse_adapter(tmp_path):
    trained_llama(tmp_path)
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "SPP adapter" in card and "import spp_peft" in card
    assert "50.00%" in card and "2:4" in card
    assert "KeyError: 'SPP'" in card
    assert card.count("## SPP adapter") == 1


def test_model_card_of_a_deep_model_is_short_with_hub_metadata(tmp_path):
    """SmolLM2's card once listed all 210 pruned layers (7,416 characters on one line): now one summary line,
    the install and loading instructions, and hub metadata (tags, base_model) in the YAML header."""
    from huggingface_hub import ModelCard

    from spp_peft.pruning import attach_metadata, prune
    from spp_peft.testing import tiny_llama

    base = tiny_llama(hidden_size=32, num_layers=30, num_heads=4, num_kv_heads=2, intermediate_size=64)
    attach_metadata(base, prune(base, method="magnitude", pattern="2:4", show_progress=False))
    assert len(base.config.spp_pruning["pruned_layers"]) == 210
    base.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    model = get_peft_model(base, SPPConfig(target_modules=MODEL_TARGETS["llama"], r=4, spp_alpha=8))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert len(text) < 3000, len(text)
    assert "layers.29" not in text and "210 layers" in text and "magnitude" in text
    for needle in ("pip install spp-peft", "import spp_peft", "spp_peft.load_adapter", "spp-peft autoload enable",
                   "spp_peft.autoload", "KeyError: 'SPP'"):
        assert needle in text, needle
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {"spp", "sparse", "pruned", "sparsity-preserved", "2:4"} <= set(card.data.tags)
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M" in card.data.tags
    # Saving again (and adding the training section) keeps one copy of each section and each tag.
    from spp_peft.hub import write_training_card

    info = {"method": "spp", "lr": 1e-2, "train": {"r": 4, "alpha": 8, "target_modules": ["q_proj"],
            "lr_scheduler": "linear", "warmup": 0.0, "weight_decay": 0.0, "batch_size": 2, "grad_accum": 1}}
    write_training_card(tmp_path / "README.md", info, "adapter")
    model.save_pretrained(tmp_path)
    again = ModelCard.load(tmp_path / "README.md")
    for heading in ("## SPP adapter", "## Training (spp-peft)", "### Framework versions", "- PEFT "):
        assert again.text.count(heading) == 1, heading
    assert sorted(again.data.tags) == sorted(set(again.data.tags)) == sorted(card.data.tags)
    assert again.text.index("## SPP adapter") < again.text.index("## Training") < again.text.index("- PEFT ")


def test_from_pretrained_gives_identical_logits(tmp_path):
    model = trained_llama(tmp_path)
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(outputs(loaded, inputs), expected)


def test_fresh_process_load_gives_identical_logits(tmp_path):
    model = trained_llama(tmp_path)
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    torch.save(inputs["input_ids"], tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import torch, spp_peft
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / 'ids.pt')!r})).logits
        torch.save(logits, {str(tmp_path / 'logits.pt')!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


def test_missing_import_is_a_keyerror_and_load_adapter_always_works(tmp_path):
    """Documented behaviour: without `import spp_peft` PEFT fails with KeyError: 'SPP';
    spp_peft.load_adapter works from any script."""
    trained_llama(tmp_path)
    script = textwrap.dedent(
        f"""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        try:
            PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
        except KeyError as err:
            print("KEYERROR", err)
        from spp_peft import load_adapter
        model = load_adapter(base, {str(tmp_path / 'adapter')!r})
        print("LOADED", type(model.base_model).__name__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=ROOT, capture_output=True,
                         text=True).stdout
    assert "KEYERROR 'SPP'" in out
    assert "LOADED SPPModel" in out


def test_transformers_load_adapter(tmp_path):
    model = trained_llama(tmp_path)
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    base.load_adapter(str(tmp_path / "adapter"), adapter_name="spp")
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, expected, rtol=0, atol=0)


def test_auto_spp_model_loads_base_and_adapter(tmp_path):
    model = trained_llama(tmp_path)
    inputs = inputs_for("llama")
    with torch.no_grad():
        expected = outputs(model, inputs)
    # base_model_name_or_path was the in-memory model's (empty) name; point it at the saved base.
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    config_path.write_text(json.dumps(config))
    loaded = spp_peft.AutoSPPModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.equal(outputs(loaded, inputs), expected)


def test_loading_onto_a_base_with_other_masks_is_refused(tmp_path):
    trained_llama(tmp_path, pattern="2:4")
    other = prune_model_(build("llama"), "llama", "4:8")
    before = {n: p.clone() for n, p in other.named_parameters()}
    with pytest.raises(SparsityViolation, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*verify_base_masks"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")
    # nothing was injected or changed
    assert not any("spp_" in n for n, _ in other.named_parameters())
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    with pytest.raises(SparsityViolation, match="q_proj"):
        other.load_adapter(str(tmp_path / "adapter"))
    # explicit override
    loaded = spp_peft.load_adapter(other, str(tmp_path / "adapter"), verify_base_masks=False)
    assert isinstance(loaded.base_model, spp_peft.SPPModel)


def test_trainable_load_resumes_training(tmp_path):
    trained_llama(tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       tmp_path / "adapter", is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".spp_A." in n or ".spp_B." in n for n in trainable)
