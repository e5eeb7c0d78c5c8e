"""Instruction records for supervised fine-tuning: loading them, and rendering them with the Alpaca prompt
template or the tokenizer's chat template into ``input_ids`` / ``labels`` (the reference's
``train_on_inputs`` option masks the prompt out of the loss; in a conversation, everything but the assistant
turns)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

from .chat import ChatTokens, chat_tokens, end_with_eos, has_chat_template, token_ids
from .text import eos_token_id, hub_dataset_id, split_topics

#: What the training data look like: plain text for language modelling, or instruction records rendered
#: with the Alpaca prompt template or the tokenizer's chat template.
TRAIN_FORMATS = ("text", "alpaca", "chat")
#: Label of tokens that do not count in the loss (PyTorch's cross-entropy ``ignore_index``).
IGNORE_INDEX = -100

#: The Stanford Alpaca prompt, as in alpaca-lora's ``templates/alpaca.json`` (used by the SPP reference).
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def builtin_instructions(split: str = "train") -> list[dict]:
    """An offline instruction dataset made from the built-in corpus: "explain topic X" -> the topic's text.

    One record per pydoc topic of the split (see :func:`spp_peft.data.builtin_text`), with Alpaca fields
    ``instruction`` / ``input`` / ``output``. It is small and narrow; it exists so that the instruction
    formats can be exercised without the network, not as a substitute for Alpaca-GPT4.
    """
    return [
        {"instruction": f"Explain the Python language topic '{key}'.", "input": "", "output": text.strip()}
        for key, text in split_topics(split, "builtin_instructions")
    ]


def load_records(source: Union[str, os.PathLike, Sequence[dict]], max_samples: Optional[int] = None) -> list[dict]:
    """Load instruction records (dicts) for fine-tuning.

    Args:
        source: ``"builtin:instructions"`` (:func:`builtin_instructions`, train split); a local ``.json`` /
            ``.jsonl`` file of records (Alpaca fields ``instruction``/``input``/``output``, or a
            ``messages`` list of ``{"role", "content"}``); a hub dataset ``"name[:config][:split]"``
            (e.g. ``"vicgalle/alpaca-gpt4"``, needs the network); or a list of dicts.
        max_samples: keep only the first ``max_samples`` records.
    """
    if isinstance(source, (list, tuple)):
        records = [dict(r) for r in source]
    else:
        name = os.fspath(source)
        if name in ("builtin:instructions", "builtin:instructions:train"):
            records = builtin_instructions("train")
        elif name == "builtin:instructions:heldout":
            records = builtin_instructions("heldout")
        else:
            records = [dict(r) for r in _load_record_dataset(name)]
    if max_samples is not None:
        records = records[: max(0, int(max_samples))]
    return records


def _load_record_dataset(name: str):
    """The ``datasets`` dataset of a local ``.json`` / ``.jsonl`` file or of a hub id."""
    from datasets import load_dataset

    path = Path(name).expanduser()
    if path.is_dir():
        raise ValueError(f"load_records: {name!r} is a folder; pass a .json or .jsonl file")
    if path.is_file():
        if path.suffix.lower() not in (".json", ".jsonl"):
            raise ValueError(f"{path}: instruction data must be a .json or .jsonl file of records")
        return load_dataset("json", data_files=str(path), split="train")
    if path.suffix.lower() in (".json", ".jsonl") or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"load_records: file {name!r} does not exist")
    hub_name, config, split = hub_dataset_id(name)
    try:
        return load_dataset(hub_name, config, split=split)
    except Exception as err:  # network errors, missing datasets: one clear message
        raise RuntimeError(
            f"could not load hub dataset {name!r}: {err}. Offline, use 'builtin:instructions' "
            "or a local .json/.jsonl file."
        ) from err


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for a record (the response follows it directly)."""
    if input:
        return ALPACA_PROMPT_INPUT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def record_messages(record: dict) -> list[dict]:
    """A record as chat messages: its own ``messages``, or user = instruction (+ input), assistant = output."""
    if "messages" in record:
        return [dict(m) for m in record["messages"]]
    _require_fields(record, ("instruction", "output"))
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def _require_fields(record: dict, names: Sequence[str]) -> None:
    missing = [n for n in names if n not in record]
    if missing:
        raise ValueError(f"instruction record lacks field(s) {missing}; it has {sorted(record)}")


def tokenize_instruction(
    tokenizer, record: dict, fmt: str = "alpaca", cutoff_len: int = 512, train_on_inputs: bool = True,
    add_eos: Optional[bool] = None,
) -> dict:
    """Tokenize one instruction record for supervised fine-tuning.

    ``"alpaca"``: prompt = :func:`alpaca_prompt`, then the output and the EOS token, as in alpaca-lora. Prompt
    and response are tokenized separately and concatenated, so the boundary used by ``train_on_inputs=False``
    is exact. ``"chat"``: the tokenizer's chat template over :func:`record_messages` (any number of turns).

    With ``train_on_inputs=False`` only the response is in the loss (the reference's option): the Alpaca
    output, or every assistant turn of a conversation (its content and end of turn, as TRL's
    ``assistant_only_loss``; see :mod:`spp_peft.data.chat`); other tokens get label :data:`IGNORE_INDEX`.

    ``add_eos``: ``None`` follows the format: Alpaca appends EOS (when the tokenizer has one), a chat is as its
    template renders it (TRL adds no EOS to conversations: the template ends the turns). ``True`` appends EOS
    where it is not already the last token (whitespace aside), and is refused when the tokenizer has none;
    ``False`` appends nothing. Sequences are then cut to ``cutoff_len`` tokens.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` (lists of ints of equal length).
    """
    if fmt == "alpaca":
        full, trained = _alpaca_tokens(tokenizer, record, add_eos)
    elif fmt == "chat":
        full, trained = _chat_tokens(tokenizer, record, train_on_inputs, add_eos)
    else:
        raise ValueError(f"tokenize_instruction: format must be 'alpaca' or 'chat', got {fmt!r}")
    full, trained = full[:cutoff_len], trained[:cutoff_len]
    labels = [t if keep or train_on_inputs else IGNORE_INDEX for t, keep in zip(full, trained)]
    return {"input_ids": full, "labels": labels}


def _alpaca_tokens(tokenizer, record: dict, add_eos: Optional[bool]) -> tuple[list[int], list[int]]:
    """The ids of prompt + response (+ EOS) and a 0/1 mask of the response."""
    _require_fields(record, ("instruction", "output"))
    prompt = token_ids(tokenizer(alpaca_prompt(record["instruction"], record.get("input") or ""))["input_ids"])
    response = token_ids(tokenizer(record["output"], add_special_tokens=False)["input_ids"])
    if add_eos is None:  # alpaca-lora's default, where the tokenizer has an EOS
        add_eos = getattr(tokenizer, "eos_token_id", None) is not None
    if add_eos:
        response = response + [eos_token_id(tokenizer, "alpaca")]
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _chat_tokens(tokenizer, record: dict, train_on_inputs: bool, add_eos: Optional[bool]):
    """The ids of the rendered conversation and a 0/1 mask of its assistant turns."""
    if not has_chat_template(tokenizer):
        raise ValueError("data format 'chat' needs a tokenizer with a chat template; use format 'alpaca'")
    messages = record_messages(record)
    if train_on_inputs:  # every token is trained: no need to find (or be able to find) the turns
        ids = token_ids(tokenizer.apply_chat_template(messages, tokenize=True))
        tokens = ChatTokens(ids, [1] * len(ids))
    else:
        tokens = chat_tokens(tokenizer, messages)
    if add_eos:
        tokens = end_with_eos(tokenizer, messages, tokens)
    return tokens.input_ids, tokens.assistant_mask
