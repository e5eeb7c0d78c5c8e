"""Conversations rendered with the tokenizer's chat template, and which of their tokens are the assistant's:
every assistant turn is trained, as TRL's ``assistant_only_loss`` does.

A template with transformers' ``{% generation %}`` markers says itself which tokens are the assistant's
(``apply_chat_template(return_assistant_tokens_mask=True)``, TRL's path). Most shipped templates have none
(SmolLM2's, Llama's, ...), and TRL refuses those it cannot patch; here the turns are then found the way a chat is
served: assistant turn *i* is what rendering ``messages[:i + 1]`` adds to rendering ``messages[:i]`` with the
generation prompt. That is the turn's content and its end of turn (SmolLM2: ``content<|im_end|>\\n``), without
the header that the server writes at inference (``<|im_start|>assistant\\n``): exactly the tokens the model must
produce, the span TRL's training templates mark.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from .text import eos_token_id

#: transformers' marker of the assistant's part of a template (TRL's ``has_generation_markers`` pattern).
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class ChatTokens:
    """A rendered, tokenized conversation."""

    input_ids: list[int]
    #: 1 on the tokens of every assistant turn (content and end of turn), 0 elsewhere.
    assistant_mask: list[int]


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def token_ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); older versions a list.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def render(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_tokens(tokenizer, messages: Sequence[dict]) -> ChatTokens:
    """The conversation's token ids (those of ``apply_chat_template(messages, tokenize=True)``) and its
    assistant mask.

    Raises:
        ValueError: when the template has no ``{% generation %}`` markers and renders a conversation's start
            differently from the whole (it rewrites earlier turns), so that the turns cannot be told apart.
    """
    template = tokenizer.chat_template
    if _GENERATION_MARKER.search(template if isinstance(template, str) else str(template.get("default", ""))):
        out = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        return ChatTokens(token_ids(out), list(out["assistant_masks"]))
    text = render(tokenizer, messages)
    spans = [_turn_span(tokenizer, messages, i, text) for i, m in enumerate(messages) if m.get("role") == "assistant"]
    try:
        # How apply_chat_template tokenizes what it rendered; the offsets place the turns' characters.
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise ValueError("finding the assistant turns of a chat template needs a fast tokenizer (character "
                         "offsets); use train_on_inputs=True") from err
    mask = [int(any(a < end and b > start for start, end in spans)) for a, b in encoded["offset_mapping"]]
    return ChatTokens(token_ids(encoded), mask)


def _turn_span(tokenizer, messages: Sequence[dict], index: int, text: str) -> tuple[int, int]:
    """Characters of assistant turn ``index`` in ``text``, the rendering of the whole conversation."""
    from jinja2 import TemplateError

    try:
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1])
    except TemplateError as err:  # e.g. a template that reads messages[0] given a conversation's empty start
        before, through = None, str(err)
    if before is None or not (text.startswith(through) and through.startswith(before) and len(before) < len(through)):
        raise ValueError(
            f"the chat template renders the conversation up to its assistant turn {index} otherwise than as the "
            "start of the whole (it rewrites earlier turns), so the assistant's tokens cannot be found: add "
            "{% generation %} / {% endgeneration %} markers around the assistant turns of the template (as TRL's "
            "training templates do), or train on every token (train_on_inputs=True)"
        )
    return len(before), len(through)


def end_with_eos(tokenizer, messages: Sequence[dict], tokens: ChatTokens) -> ChatTokens:
    """``tokens`` ending with the tokenizer's EOS: appended unless the conversation already ends with it
    (whitespace aside: SmolLM2's turns end ``<|im_end|>\\n``), counted as the assistant's when the
    conversation ends with an assistant turn."""
    eos = eos_token_id(tokenizer, "chat")
    for token in reversed(tokens.input_ids):
        if token == eos:
            return tokens
        if tokenizer.decode([token]).strip():
            break
    last_is_assistant = bool(messages) and messages[-1].get("role") == "assistant"
    return ChatTokens(tokens.input_ids + [eos], tokens.assistant_mask + [int(last_is_assistant)])
