"""Perplexity (WikiText-2 protocol) against a direct computation with the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from spp_peft.data import builtin_text, token_stream
from spp_peft.evaluation import perplexity
from spp_peft.testing import byte_tokenizer, tiny_llama


def test_perplexity_matches_the_models_own_loss():
    model, tok = tiny_llama(), byte_tokenizer()
    texts = builtin_text("heldout")[:3]
    stream = token_stream(tok, texts)[:1000]
    windows = stream[: (1000 // 64) * 64].reshape(-1, 64)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))  # equal windows: mean of means == mean over tokens
    got = perplexity(model, stream, seqlen=64, batch_size=5, show_progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, batch_size=3, show_progress=False) == pytest.approx(got, rel=1e-6)
    full = perplexity(model, tok, texts=texts, seqlen=64, max_tokens=1000, show_progress=False)
    assert full == pytest.approx(got, rel=1e-6)


def test_perplexity_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="pass texts="):
        perplexity(model, byte_tokenizer())
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, torch.arange(10), seqlen=64)
