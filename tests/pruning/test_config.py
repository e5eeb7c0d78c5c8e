"""PruningConfig validation and the registry of methods it checks names against."""

from __future__ import annotations

import pytest
import torch

from spp_peft.pruning import METHODS, REGISTRY, PruningConfig, PruningMethod


def test_config_round_trip_and_unknown_options():
    config = PruningConfig(method="sparsegpt", pattern="2:4", target_modules=("q_proj",))
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert config.effective_sparsity == 0.5 and config.nm == (2, 4)
    with pytest.raises(ValueError, match="unknown pruning option"):
        PruningConfig.from_dict({"method": "wanda", "ratio": 0.5})
    with pytest.raises(ValueError, match="blocksize"):
        PruningConfig(method="sparsegpt", blocksize=0)
    assert PruningConfig(method="sparsegpt", pattern="2:8", blocksize=12).effective_blocksize == 8
    assert PruningConfig(method="sparsegpt", pattern="2:5", blocksize=128).effective_blocksize == 125
    assert PruningConfig(method="sparsegpt", pattern="1:3", blocksize=2).effective_blocksize == 3


def test_the_registry_is_the_list_of_methods():
    assert METHODS == tuple(REGISTRY) == ("magnitude", "wanda", "sparsegpt")
    assert all(isinstance(entry, PruningMethod) for entry in REGISTRY.values())
    assert [m for m in METHODS if PruningConfig(method=m).needs_calibration] == ["wanda", "sparsegpt"]
    for bad in ("random", None, ["wanda"]):
        with pytest.raises(ValueError, match="pruning method must be one of"):
            PruningConfig(method=bad)


def test_every_method_prunes_a_layer_through_the_uniform_signature():
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    inputs = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    for name, entry in REGISTRY.items():
        config = PruningConfig(method=name, pattern="2:4")
        stats = None
        if entry.needs_calibration:
            stats = entry.statistics(16, torch.device("cpu"))
            stats.add_batch(inputs)
        pruned = entry.prune(weight, stats, config)
        assert pruned.shape == weight.shape
        assert int((pruned.reshape(8, 4, 4) == 0).sum(-1).min()) == 2, name
