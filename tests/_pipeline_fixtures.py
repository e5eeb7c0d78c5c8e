"""Shared set-up of the training / pipeline / CLI tests: a tiny Llama with a byte tokenizer, saved to disk,
dense and pruned (magnitude 2:4, no calibration needed), so every test runs real code in seconds."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from spp_peft.testing import byte_tokenizer, tiny_llama
from spp_peft.pruning import prune, save_pruned

#: torch's intra-op thread count when the tests started (the tiny-model tests use one thread, see below).
DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread, and much faster on a busy machine (OpenMP threads of
    microsecond-sized matmuls wait for each other when cores are shared, e.g. under pytest-xdist)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(DEFAULT_THREADS)


@contextmanager
def all_threads():
    """For a test on the real model inside a one-thread module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(DEFAULT_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
