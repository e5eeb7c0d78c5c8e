"""Shared set-up of the training / pipeline / CLI tests: a tiny Llama with a byte tokenizer, saved to disk,
dense and pruned (magnitude 2:4, no calibration needed), so every test runs real code in seconds."""

from __future__ import annotations

from pathlib import Path

import torch

from spp_peft.models import byte_tokenizer, tiny_llama
from spp_peft.pruning import prune, save_pruned

TINY = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)


def make_tiny(seed: int = 0):
    return tiny_llama(seed=seed, **TINY), byte_tokenizer()


def save_dense(folder: Path) -> Path:
    model, tokenizer = make_tiny()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def pruned_tiny(pattern: str = "2:4"):
    model, tokenizer = make_tiny()
    result = prune(model, method="magnitude", pattern=pattern, show_progress=False)
    return model, tokenizer, result


def save_pruned_tiny(folder: Path) -> Path:
    model, tokenizer, result = pruned_tiny()
    save_pruned(model, tokenizer, folder, result)
    return folder


def zero_masks(model) -> dict[str, torch.Tensor]:
    from spp_peft.sparsity import linear_weights

    return {n: (w == 0).clone() for n, (w, _) in linear_weights(model).items() if bool((w == 0).any())}
