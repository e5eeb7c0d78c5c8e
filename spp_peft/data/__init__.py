"""Text sources and token windows for calibration, training and evaluation (:mod:`.text`), instruction
records for supervised fine-tuning (:mod:`.instructions`), and the assistant turns of chat-template
conversations (:mod:`.chat`)."""

from .chat import ChatTokens, chat_tokens
from .instructions import (
    ALPACA_PROMPT_INPUT,
    ALPACA_PROMPT_NO_INPUT,
    IGNORE_INDEX,
    TRAIN_FORMATS,
    alpaca_prompt,
    builtin_instructions,
    load_records,
    record_messages,
    tokenize_instruction,
)
from .text import (
    BUILTIN_SPLITS,
    DOC_SEPARATOR,
    GPL3_PATHS,
    HELDOUT_EVERY,
    TextSource,
    append_eos,
    builtin_text,
    calibration_windows,
    lm_windows,
    load_texts,
    out_of_domain_source,
    out_of_domain_text,
    token_stream,
    tokenize,
)

__all__ = [
    "ALPACA_PROMPT_INPUT", "ALPACA_PROMPT_NO_INPUT", "BUILTIN_SPLITS", "ChatTokens", "DOC_SEPARATOR",
    "GPL3_PATHS", "HELDOUT_EVERY", "IGNORE_INDEX", "TRAIN_FORMATS", "TextSource", "alpaca_prompt", "append_eos",
    "builtin_instructions", "builtin_text", "calibration_windows", "chat_tokens", "lm_windows", "load_records",
    "load_texts", "out_of_domain_source", "out_of_domain_text", "record_messages", "token_stream", "tokenize",
    "tokenize_instruction",
]
