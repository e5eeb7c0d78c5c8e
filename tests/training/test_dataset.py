"""spp_peft.training.dataset: training examples from text windows."""

from __future__ import annotations

import torch

from spp_peft import training as T
from spp_peft.data import lm_windows, token_stream


def test_text_windows_are_the_token_stream_cut_without_overlap(pruned):
    tokenizer = pruned[1]
    texts = ["first document " * 20, "second one " * 30]
    windows = lm_windows(tokenizer, texts, 16)
    stream = token_stream(tokenizer, texts)
    assert windows.shape == (stream.numel() // 16, 16)
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])
    ds = T.build_dataset(tokenizer, T.DataConfig(source="builtin", cutoff_len=16, max_samples=5))
    assert len(ds) == 5 and all(torch.equal(e["input_ids"], e["labels"]) for e in ds.examples)
