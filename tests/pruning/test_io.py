"""The pruning metadata in ``config.spp_pruning``: what each method records, and what save_pruned writes."""

from __future__ import annotations

import json

from spp_peft import __version__
from spp_peft.testing import byte_tokenizer, tiny_llama
from spp_peft.pruning import CONFIG_KEY, prune, pruning_metadata, save_pruned


def test_magnitude_metadata_records_only_its_own_options(tmp_path):
    model = tiny_llama()
    assert pruning_metadata(model) is None
    result = prune(model, "magnitude", 0.5, comparison="layer", show_progress=False)
    out = save_pruned(model, byte_tokenizer(), tmp_path / "pruned", result)
    meta = json.loads((out / "config.json").read_text())[CONFIG_KEY]
    assert meta == pruning_metadata(model)
    assert sorted(meta) == sorted([
        "method", "sparsity", "pattern", "comparison", "target_modules", "calibration", "blocksize", "percdamp",
        "pruned_layers", "total_sparsity_of_pruned_layers", "seconds", "spp_peft_version",
    ])
    assert (meta["method"], meta["comparison"], meta["calibration"]) == ("magnitude", "layer", None)
    assert meta["blocksize"] is None and meta["percdamp"] is None
    assert meta["pruned_layers"] == [layer.name for layer in result.layers]
    assert meta["total_sparsity_of_pruned_layers"] == 0.5 and meta["spp_peft_version"] == __version__


def test_sparsegpt_metadata_records_calibration_and_the_effective_blocksize(calib_ids):
    model = tiny_llama()
    result = prune(
        model, "sparsegpt", pattern="2:4", calibration=calib_ids[:4], blocksize=30, calibration_source="builtin",
        seed=0, show_progress=False,
    )
    meta = result.metadata()
    assert meta["calibration"] == {"source": "builtin", "nsamples": 4, "seqlen": 64, "seed": 0}
    assert (meta["comparison"], meta["blocksize"], meta["percdamp"], meta["sparsity"]) == (None, 28, 0.01, 0.5)
