"""Chat-template fixtures: SmolLM2-135M-Instruct's own template on the offline byte tokenizer.

The template is the one in the built-in model's GGUF metadata (``tokenizer.chat_template``), copied literally so
that the tests need neither the model nor its 3.5 MB tokenizer.
"""

from __future__ import annotations

from spp_peft.testing import byte_tokenizer

SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: The same template with transformers' ``{% generation %}`` markers around each assistant turn's content and
#: end of turn, as TRL's training templates place them (e.g. its ``qwen2_5_training.jinja``, a ChatML template).
SMOLLM2_TRAINING_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

#: Multi-turn conversations: two and three exchanges, one with its own system message.
CONVERSATIONS = [
    [
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome!"},
    ],
]


def smollm2_byte_tokenizer(template: str = SMOLLM2_CHAT_TEMPLATE):
    """The byte tokenizer with SmolLM2's chat tokens: ``<|im_start|>`` (BOS) and ``<|im_end|>`` (EOS and PAD),
    each one token, and SmolLM2's chat template."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    tokenizer.chat_template = template
    return tokenizer
