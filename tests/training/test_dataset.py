"""spp_peft.training.dataset: training examples (a ``datasets.Dataset``) and their padding (transformers'
``DataCollatorForSeq2Seq``), equal to the hand-written versions they replaced."""

from __future__ import annotations

import copy
import json

import datasets
import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer

from spp_peft import training as T
from spp_peft.data import IGNORE_INDEX, lm_windows, token_stream
from spp_peft.testing import byte_tokenizer


def test_text_windows_are_the_token_stream_cut_without_overlap(pruned):
    tokenizer = pruned[1]
    texts = ["first document " * 20, "second one " * 30]
    windows = lm_windows(tokenizer, texts, 16)
    stream = token_stream(tokenizer, texts)
    assert windows.shape == (stream.numel() // 16, 16)
    assert torch.equal(windows.reshape(-1), stream[: windows.numel()])
    ds = T.build_dataset(tokenizer, T.DataConfig(source="builtin", cutoff_len=16, max_samples=5))
    assert len(ds) == 5 and all(e["input_ids"] == e["labels"] for e in ds)
    assert isinstance(ds, datasets.Dataset) and ds.num_tokens == 5 * 16


def test_text_add_eos_ends_every_document_with_eos():
    tokenizer = byte_tokenizer()
    texts = ["first document", "second one<eos>"]
    plain = T.build_dataset(tokenizer, T.DataConfig(source=texts, cutoff_len=4))
    assert plain["input_ids"] == lm_windows(tokenizer, texts, 4).tolist()  # the default: the WikiText protocol
    ended = T.build_dataset(tokenizer, T.DataConfig(source=texts, cutoff_len=4, add_eos=True))
    stream = token_stream(tokenizer, ["first document<eos>", "second one<eos>"])
    assert sum(ended["input_ids"], []) == stream[: len(ended) * 4].tolist()
    assert stream.tolist().count(tokenizer.eos_token_id) == 2  # appended where missing only


def reference_padding(batch, pad_token_id):
    """The hand-written collator that DataCollatorForSeq2Seq replaced: right padding, labels -100, mask."""
    length = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for i, example in enumerate(batch):
        n = len(example["input_ids"])
        ids[i, :n] = torch.as_tensor(example["input_ids"])
        labels[i, :n] = torch.as_tensor(example["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def assert_same_batch(got, expected):
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


EXAMPLES = [
    {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9]},
    {"input_ids": [1, 2], "labels": [1, 2]},
    {"input_ids": [3, 4, 5], "labels": [IGNORE_INDEX, 4, IGNORE_INDEX]},
]


@pytest.mark.parametrize("variant", ["plain", "left_padding", "no_pad_token"])
def test_collator_is_datacollator_for_seq2seq_and_pads_as_before(variant):
    tokenizer = byte_tokenizer()
    if variant == "left_padding":  # set for generation by some chat tokenizers; training pads right, as TRL does
        tokenizer.padding_side = "left"
    if variant == "no_pad_token":  # the EOS pads
        tokenizer.pad_token = None
    before = copy.deepcopy(tokenizer.special_tokens_map), tokenizer.padding_side
    collator = T.data_collator(tokenizer)
    assert isinstance(collator, DataCollatorForSeq2Seq) and collator.label_pad_token_id == IGNORE_INDEX
    assert (tokenizer.special_tokens_map, tokenizer.padding_side) == before  # the caller's tokenizer is untouched
    rows = list(T.TokenDataset.from_list(EXAMPLES))
    assert_same_batch(collator(rows), reference_padding(EXAMPLES, tokenizer.eos_token_id))


def test_trainer_batches_equal_the_hand_written_dataset_and_collator(pruned, tmp_path):
    """The Trainer's shuffled batches, from the same seed, are those of the former list dataset + collator."""
    model, tokenizer = pruned
    records = tmp_path / "records.jsonl"
    records.write_text("\n".join(json.dumps({"instruction": "Count.", "output": " ".join(map(str, range(i)))})
                                  for i in range(1, 11)))
    ds = T.build_dataset(tokenizer, T.DataConfig(source=str(records), format="alpaca", train_on_inputs=False))
    examples = [dict(e) for e in ds]

    class ListDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    args = T.training_arguments(T.TrainConfig(batch_size=3, max_steps=2, progress=False), tmp_path / "run")
    new = Trainer(model=model, args=args, train_dataset=ds, data_collator=T.data_collator(tokenizer))
    old = Trainer(model=model, args=args, train_dataset=ListDataset(),
                  data_collator=lambda batch: reference_padding(batch, tokenizer.pad_token_id))
    for got, expected in zip(new.get_train_dataloader(), old.get_train_dataloader(), strict=True):
        assert_same_batch(got, expected)


def test_chat_records_from_a_jsonl_file_train_every_assistant_turn(tmp_path):
    from ..data._chat_fixtures import CONVERSATIONS, smollm2_byte_tokenizer

    tokenizer = smollm2_byte_tokenizer()
    records = tmp_path / "chats.jsonl"
    records.write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS))
    ds = T.build_dataset(tokenizer, T.DataConfig(source=str(records), format="chat", train_on_inputs=False,
                                                 cutoff_len=4096))
    for row, messages in zip(ds, CONVERSATIONS, strict=True):
        trained = tokenizer.decode([label for label in row["labels"] if label != IGNORE_INDEX])
        assert trained == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
