"""Quantized bases in recipes, the pipeline, the CLI and the loader (issue 12 item 4): prune in full precision,
train on the pruned model loaded 4-bit / 8-bit, merge into the full-precision pruned model, report both."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from spp_peft import pipeline as P
from spp_peft.errors import RecipeError
from spp_peft.models import QUANTIZATION_KEYS, check_quantization, load_model
from spp_peft.recipe import load_recipe
from spp_peft.report import format_table, label

from ._pipeline_fixtures import one_thread, save_dense, save_pruned_tiny, zero_masks  # noqa: F401

pytest.importorskip("bitsandbytes")
NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("tiny"))


def _recipe(tiny_dir, out, **model):
    return load_recipe({
        "name": "q", "output_dir": str(out),
        "model": {"name_or_path": str(tiny_dir), **model},
        "pruning": {"method": "magnitude", "pattern": "2:4"},
        "data": {"cutoff_len": 32, "max_samples": 16},
        "train": {"methods": ["spp"], "max_steps": 3, "batch_size": 2, "r": 4, "alpha": 8, "lr": 2e-2,
                  "progress": False},
        "eval": {"seqlen": 32, "max_tokens": 256, "dense": False},
        "export": {"methods": ["spp"]},
        "report": {"plots": False},
    })


def test_keys_are_bitsandbytesconfigs():
    from transformers import BitsAndBytesConfig

    params = [p for p in inspect.signature(BitsAndBytesConfig.__init__).parameters if p not in ("self", "kwargs")]
    assert tuple(params) == QUANTIZATION_KEYS


@pytest.mark.parametrize("settings, message", [
    ({"load_in_4bit": True, "bnb_4bit_quant": "nf4"}, "unknown key(s) bnb_4bit_quant"),
    ({"bnb_4bit_quant_type": "nf4"}, "exactly one of load_in_4bit"),
    ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one of load_in_4bit"),
])
def test_recipe_refuses_bad_quantization_before_any_work(tiny_dir, tmp_path, settings, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        _recipe(tiny_dir, tmp_path / "run", quantization=settings)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'spp-peft\[quant\]'"):
        check_quantization({"load_in_4bit": True})


def test_compare_needs_quantization(tiny_dir, tmp_path):
    with pytest.raises(RecipeError, match="compare_full_precision"):
        _recipe(tiny_dir, tmp_path / "run", compare_full_precision=True)


@pytest.mark.parametrize("settings, kind", [(NF4, "4bit"), ({"load_in_8bit": True}, "8bit")])
def test_load_model_quantized(tmp_path, settings, kind):
    folder = save_pruned_tiny(tmp_path / "pruned")
    model, _ = load_model(str(folder), quantization=settings)
    assert getattr(model, f"is_loaded_in_{kind}")
    with pytest.raises(ValueError, match="needs a model folder"):
        load_model("smollm2", quantization=settings)


def test_pipeline_reports_the_quantized_run_beside_full_precision(tiny_dir, tmp_path):
    recipe = _recipe(tiny_dir, tmp_path / "run", quantization=NF4, compare_full_precision=True)
    lines = []
    results = P.run(recipe, show_progress=False, echo=lines.append)
    out = tmp_path / "run"
    assert set(results.perplexity["heldout"]) == {"pruned", "spp", "spp_4bit"}
    assert all(v.ok for v in results.verified.values())
    q = results.training["spp_4bit"]
    assert q["trained_on"]["base"] == "4bit" and q["trained_on"]["quantization"] == NF4
    assert results.training["spp"]["trained_on"]["base"] == "full precision"
    assert q["steps"] == 3 and results.training["spp"]["steps"] == 3
    # The merged export is the full-precision pruned model with exactly its zeros.
    from spp_peft.models import load_model as load

    pruned, _ = load(str(out / "pruned"))
    merged, _ = load(str(out / "merged" / "spp_4bit"))
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    for name, zeros in zero_masks(pruned).items():
        assert torch.equal(zero_masks(merged)[name], zeros), name
    table = format_table(results)
    assert "SPP on 4-bit base" in table and label("spp_8bit") == "SPP on 8-bit base"
    assert json.loads((out / "report.json").read_text())["training"]["spp_4bit"]["trained_on"]["base"] == "4bit"


def test_cli_train_load_in_4bit_then_merge_into_full_precision(tmp_path):
    from spp_peft import cli
    from spp_peft.models import load_model as load

    pruned = save_pruned_tiny(tmp_path / "pruned")
    run_dir, merged = tmp_path / "spp", tmp_path / "merged"
    assert cli.main(["train", "--model", str(pruned), "--method", "spp", "--data", "builtin", "--cutoff-len", "32",
                     "--max-samples", "8", "--max-steps", "2", "--batch-size", "2", "--r", "4", "--lr", "2e-2",
                     "--load-in-4bit", "--bnb-4bit-quant-type", "fp4", "--output", str(run_dir), "-q"]) == 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPP"
    assert cli.main(["merge", "--model", str(pruned), "--adapter", str(run_dir / "adapter"),
                     "--output", str(merged)]) == 0
    base, _ = load(str(pruned))
    out, _ = load(str(merged))
    for name, zeros in zero_masks(base).items():
        assert torch.equal(zero_masks(out)[name], zeros), name


def test_cli_train_refuses_both_bit_widths(tmp_path, capsys):
    from spp_peft import cli

    code = cli.main(["train", "--model", str(tmp_path), "--load-in-4bit", "--load-in-8bit",
                     "--output", str(tmp_path / "o")])
    assert code != 0 and "exactly one of load_in_4bit" in capsys.readouterr().err


def test_the_qlora_demo_recipe_loads():
    from pathlib import Path

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "configs" / "qlora_smollm2.yaml"))
    assert recipe.model.quantization["load_in_4bit"] and recipe.model.compare_full_precision
    assert P.runner._variants(recipe) == [("spp", None), ("spp", "4bit")]
