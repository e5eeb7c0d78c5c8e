"""Training examples for the ``Trainer``: text windows or tokenized instruction records in a ``datasets.Dataset``,
padded by transformers' ``DataCollatorForSeq2Seq``."""

from __future__ import annotations

import copy

import datasets
import pyarrow.compute as pc
from transformers import DataCollatorForSeq2Seq

from spp_peft import data as spp_data

from .config import DataConfig


class TokenDataset(datasets.Dataset):
    """A ``datasets.Dataset`` of ``input_ids`` / ``labels`` rows (lists of ints) that knows its token count."""

    @property
    def num_tokens(self) -> int:
        return int(pc.sum(pc.list_value_length(self.data.column("input_ids"))).as_py() or 0)


def build_dataset(tokenizer, data: DataConfig) -> TokenDataset:
    """The training examples described by ``data`` (see :class:`DataConfig`)."""
    data.validate()
    if data.format == "text":
        texts = spp_data.load_texts(data.source, data.text_field)
        if data.add_eos:
            texts = spp_data.append_eos(tokenizer, texts)
        windows = spp_data.lm_windows(tokenizer, texts, data.cutoff_len)
        if data.max_samples is not None:
            windows = windows[: data.max_samples]
        examples = [{"input_ids": w, "labels": w} for w in windows.tolist()]
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
    return TokenDataset.from_list(examples)


def data_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """transformers' padding of ``input_ids`` / ``labels`` (with -100) / ``attention_mask``, always on the right
    as TRL pads for training (a tokenizer set to pad left for generation is left as it is), with the EOS token
    as padding where the tokenizer has no pad token."""
    if tokenizer.padding_side != "right" or tokenizer.pad_token is None:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=spp_data.IGNORE_INDEX, return_tensors="pt")
