"""Fixtures of the training tests: the tiny pruned Llama and a small text dataset."""

from __future__ import annotations

import pytest

from spp_peft import training as T

from .._pipeline_fixtures import one_thread, pruned_tiny  # noqa: F401 (one_thread: autouse fixture)


@pytest.fixture(scope="module")
def pruned():
    model, tokenizer, _ = pruned_tiny()
    return model, tokenizer


@pytest.fixture(scope="module")
def dataset(pruned):
    return T.build_dataset(pruned[1], T.DataConfig(cutoff_len=32, max_samples=24))
