"""Training examples for the ``Trainer``: text windows or tokenized instruction records, and their padding."""

from __future__ import annotations

from typing import Sequence

import torch

from spp_peft import data as spp_data

from .config import DataConfig


class TokenDataset(torch.utils.data.Dataset):
    """A list of ``{"input_ids", "labels"}`` examples (lists or 1-D tensors) for the ``Trainer``."""

    def __init__(self, examples: Sequence[dict]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def build_dataset(tokenizer, data: DataConfig) -> TokenDataset:
    """The training examples described by ``data`` (see :class:`DataConfig`)."""
    data.validate()
    if data.format == "text":
        windows = spp_data.lm_windows(tokenizer, spp_data.load_texts(data.source, data.text_field), data.cutoff_len)
        if data.max_samples is not None:
            windows = windows[: data.max_samples]
        examples = [{"input_ids": w, "labels": w} for w in windows]
    else:
        records = spp_data.load_records(data.source, data.max_samples)
        examples = [
            spp_data.tokenize_instruction(
                tokenizer, r, data.format, data.cutoff_len, data.train_on_inputs, data.add_eos
            )
            for r in records
        ]
        examples = [e for e in examples if any(label != spp_data.IGNORE_INDEX for label in e["labels"][1:])]
    if not examples:
        raise ValueError(f"no training examples from data.source={data.source!r} (format {data.format!r})")
    return TokenDataset(examples)


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, plus the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: Sequence[dict]) -> dict:
        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), spp_data.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[i, :n] = torch.as_tensor(example["input_ids"])
            labels[i, :n] = torch.as_tensor(example["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token, else 0."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
