"""spp_peft.data.instructions: instruction records, the Alpaca and chat formats, train_on_inputs."""

from __future__ import annotations

import copy

import pytest

from spp_peft.data import IGNORE_INDEX, alpaca_prompt, load_records, tokenize_instruction

from .._pipeline_fixtures import make_tiny


@pytest.fixture(scope="module")
def tokenizer():
    return make_tiny()[1]  # the byte tokenizer: one token per byte


def test_alpaca_template_and_train_on_inputs(tokenizer):
    record = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    prompt = alpaca_prompt(record["instruction"], record["input"])
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:\n")
    n_prompt = len(tokenizer(prompt)["input_ids"])
    full = tokenize_instruction(tokenizer, record, "alpaca", 4096, train_on_inputs=True)
    assert full["labels"] == full["input_ids"]
    assert full["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full["input_ids"][:n_prompt]) == prompt
    masked = tokenize_instruction(tokenizer, record, "alpaca", 4096, train_on_inputs=False)
    assert masked["input_ids"] == full["input_ids"]
    assert masked["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert masked["labels"][n_prompt:] == full["input_ids"][n_prompt:]
    cut = tokenize_instruction(tokenizer, record, "alpaca", 10, train_on_inputs=True)
    assert len(cut["input_ids"]) == 10
    no_input = alpaca_prompt("Say hi.")
    assert "### Input" not in no_input


def test_chat_format_masks_the_prompt(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    record = {"instruction": "Hi?", "output": "Hello."}
    with pytest.raises(ValueError, match="chat template"):
        tokenize_instruction(tokenizer, record, "chat", 512)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = tokenize_instruction(tokenizer, record, "chat", 512, train_on_inputs=False)
    text = tokenizer.decode(out["input_ids"])
    assert text == "<user>Hi?</s><assistant>Hello.</s>"
    n_prompt = len("<user>Hi?</s><assistant>")  # one token per byte
    assert out["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tokenizer.decode(out["labels"][n_prompt:]) == "Hello.</s>"


def test_load_records_sources(tmp_path):
    train, held = load_records("builtin:instructions"), load_records("builtin:instructions:heldout")
    assert train and held
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert len(load_records("builtin:instructions", max_samples=3)) == 3
    with pytest.raises(FileNotFoundError):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="folder"):
        load_records(str(tmp_path))
