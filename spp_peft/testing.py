"""Fixtures for tests, examples and benchmarks: tiny random models, an offline byte tokenizer, local launches.

Not part of the method: nothing in the library imports this module. It lives in the package (rather than in
``tests/``) because the distributed test scripts, the benchmarks and the notebooks run as separate processes
that need the same tiny models.
"""

from __future__ import annotations

import socket
from typing import Optional

import torch
from torch import nn

def byte_tokenizer():
    """A real, offline HuggingFace tokenizer for tiny test models: one token per UTF-8 byte (+ ``<eos>``).

    Built from a byte-level BPE with no merges, so it needs no vocabulary file and round-trips any text;
    it supports ``save_pretrained`` like any ``PreTrainedTokenizerFast``. Vocabulary size 257.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")


BYTE_VOCAB_SIZE = 257


def tiny_llama(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: Optional[int] = None,
    intermediate_size: int = 128,
    vocab_size: int = BYTE_VOCAB_SIZE,
    tie_word_embeddings: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A small random Llama (``LlamaForCausalLM``) built from a config, for tests and quick demos.

    Args:
        num_kv_heads: fewer key/value heads than ``num_heads`` gives grouped-query attention (GQA, as in
            SmolLM2 and Llama-3); ``None`` means plain multi-head attention.
        vocab_size: defaults to the size of :func:`byte_tokenizer`, so tiny models can eat real text.
        seed: initialisation seed (the model is identical for a given seed).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = BYTE_VOCAB_SIZE,
    seed: int = 0,
) -> nn.Module:
    """A small random GPT-2 (``GPT2LMHeadModel``, whose linears are ``Conv1D`` with ``(in, out)`` weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        n_positions=2048,
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 1,
        eos_token_id=vocab_size - 1,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def free_port() -> int:
    """A TCP port that is free on localhost right now (for ``--master_port`` of a local launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(script: str, nproc: int, script_args=(), python: Optional[str] = None,
                     port: Optional[int] = None) -> list[str]:
    """The command line of a single-node ``torchrun`` launch of ``script`` on ``nproc`` processes.

    Uses ``python -m torch.distributed.run`` (the same as ``torchrun``, without relying on the entry point
    being on PATH) and a fixed rendezvous on localhost with a free port, so concurrent launches don't clash.
    """
    import sys

    return [
        python or sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", str(nproc),
        "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
        script, *[str(a) for a in script_args],
    ]


def finish(proc, what: str, timeout: int = 400) -> str:
    """Wait for a launched ``subprocess.Popen`` (stdout piped, stderr merged) and return its output.

    Raises ``AssertionError`` naming ``what`` with the tail of the output when it times out (the process is
    killed) or exits non-zero, so a failed launch reads as a test failure with its cause.
    """
    import subprocess

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout} s; output tail:\n{out[-4000:]}") from None
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed with exit code {proc.returncode}; output tail:\n{out[-6000:]}")
    return out
