"""spp_peft.data.chat: every assistant turn of a conversation in the loss (TRL's ``assistant_only_loss``),
on SmolLM2's chat template, and ``add_eos`` honoured or refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spp_peft.data import IGNORE_INDEX, tokenize_instruction
from spp_peft.testing import byte_tokenizer

from ._chat_fixtures import (
    CONVERSATIONS,
    SMOLLM2_CHAT_TEMPLATE,
    SMOLLM2_TRAINING_CHAT_TEMPLATE,
    smollm2_byte_tokenizer,
)


def trained_runs(tokenizer, out: dict) -> list[str]:
    """The decoded runs of consecutive tokens that carry a label."""
    runs, current = [], []
    for token, label in zip(out["input_ids"], out["labels"]):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_every_assistant_turn_is_trained_and_nothing_else(messages):
    tokenizer = smollm2_byte_tokenizer()
    out = tokenize_instruction(tokenizer, {"messages": messages}, "chat", 4096, train_on_inputs=False)
    assert out["input_ids"] == list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])
    # Each turn: its content and its end of turn (EOS, then the template's newline), never the header.
    expected = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    assert trained_runs(tokenizer, out) == expected
    everything = tokenize_instruction(tokenizer, {"messages": messages}, "chat", 4096, train_on_inputs=True)
    assert everything["input_ids"] == out["input_ids"] and everything["labels"] == out["input_ids"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_mask_equals_transformers_generation_mask(messages):
    """Without markers, the turns are found by rendering prefixes; the result is the mask that transformers'
    ``return_assistant_tokens_mask`` (TRL's path) gives on the same template with ``{% generation %}`` markers,
    and a template with markers is used as it is."""
    marked = smollm2_byte_tokenizer(SMOLLM2_TRAINING_CHAT_TEMPLATE)
    reference = marked.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert 0 in reference["assistant_masks"] and 1 in reference["assistant_masks"]
    for template in (SMOLLM2_CHAT_TEMPLATE, SMOLLM2_TRAINING_CHAT_TEMPLATE):
        out = tokenize_instruction(smollm2_byte_tokenizer(template), {"messages": messages}, "chat", 4096,
                                   train_on_inputs=False)
        assert out["input_ids"] == list(reference["input_ids"])
        assert [int(label != IGNORE_INDEX) for label in out["labels"]] == list(reference["assistant_masks"])


def test_cutoff_keeps_the_turns_that_fit():
    tokenizer = smollm2_byte_tokenizer()
    messages = CONVERSATIONS[0]
    full = tokenize_instruction(tokenizer, {"messages": messages}, "chat", 4096, train_on_inputs=False)
    cut_at = full["input_ids"].index(tokenizer.eos_token_id, len(full["input_ids"]) // 2)
    cut = tokenize_instruction(tokenizer, {"messages": messages}, "chat", cut_at, train_on_inputs=False)
    assert cut["input_ids"] == full["input_ids"][:cut_at] and cut["labels"] == full["labels"][:cut_at]


def test_template_that_rewrites_history_is_refused_clearly():
    tokenizer = smollm2_byte_tokenizer(
        "{% for m in messages %}{% if loop.last %}<{{ m['role'] }}>{{ m['content'] }}</s>"
        "{% else %}<{{ m['role'] }}>...</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(ValueError, match="generation"):
        tokenize_instruction(tokenizer, {"messages": CONVERSATIONS[0]}, "chat", 4096, train_on_inputs=False)
    # Training on every token needs no turn boundaries.
    out = tokenize_instruction(tokenizer, {"messages": CONVERSATIONS[0]}, "chat", 4096, train_on_inputs=True)
    assert out["labels"] == out["input_ids"]


# ------------------------------------------------------------------------------------------------ add_eos

OWN_END_TEMPLATE = (  # turns end with a literal "</s>", not with the tokenizer's EOS ("<eos>")
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_add_eos_appends_eos_only_where_the_template_does_not_end_with_it():
    record = {"messages": CONVERSATIONS[0]}
    smol = smollm2_byte_tokenizer()
    as_rendered = tokenize_instruction(smol, record, "chat", 4096, train_on_inputs=False)
    # SmolLM2 ends every turn with its EOS (<|im_end|>): nothing to add.
    assert tokenize_instruction(smol, record, "chat", 4096, train_on_inputs=False, add_eos=True) == as_rendered
    assert tokenize_instruction(smol, record, "chat", 4096, train_on_inputs=False, add_eos=False) == as_rendered

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = OWN_END_TEMPLATE
    default = tokenize_instruction(tokenizer, record, "chat", 4096, train_on_inputs=False)
    assert tokenizer.decode(default["input_ids"]).endswith("<assistant>4</s>")  # the template decides
    assert tokenize_instruction(tokenizer, record, "chat", 4096, train_on_inputs=False, add_eos=False) == default
    with_eos = tokenize_instruction(tokenizer, record, "chat", 4096, train_on_inputs=False, add_eos=True)
    assert with_eos["input_ids"] == default["input_ids"] + [tokenizer.eos_token_id]
    assert trained_runs(tokenizer, with_eos) == ["Hello.</s>", "4</s><eos>"]


def test_add_eos_without_an_eos_token_is_refused():
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = OWN_END_TEMPLATE
    tokenizer.eos_token = None
    record = {"instruction": "Hi?", "output": "Hello."}
    for fmt in ("alpaca", "chat"):
        with pytest.raises(ValueError, match="add_eos.*EOS"):
            tokenize_instruction(tokenizer, record, fmt, 512, add_eos=True)
        out = tokenize_instruction(tokenizer, record, fmt, 512, add_eos=False)
        assert out["input_ids"]


def test_alpaca_add_eos():
    tokenizer = byte_tokenizer()
    record = {"instruction": "Hi?", "output": "Hello."}
    default = tokenize_instruction(tokenizer, record, "alpaca", 512)
    assert default["input_ids"][-1] == tokenizer.eos_token_id  # alpaca-lora's default
    assert tokenize_instruction(tokenizer, record, "alpaca", 512, add_eos=True) == default
    no_eos = tokenize_instruction(tokenizer, record, "alpaca", 512, add_eos=False)
    assert no_eos["input_ids"] == default["input_ids"][:-1]


# ------------------------------------------------------------------------------------------------ real SmolLM2

SMOLLM2_CACHE = Path(os.environ.get("SPP_PEFT_CACHE") or Path.home() / ".cache" / "spp_peft") / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOLLM2_CACHE / "tokenizer.json").is_file(), reason="the SmolLM2 cache is not built")
def test_real_smollm2_tokenizer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_CACHE)
    assert tokenizer.chat_template == SMOLLM2_CHAT_TEMPLATE
    for messages in CONVERSATIONS:
        out = tokenize_instruction(tokenizer, {"messages": messages}, "chat", 4096, train_on_inputs=False)
        expected = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert trained_runs(tokenizer, out) == expected
