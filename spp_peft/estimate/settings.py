"""What one memory estimate is asked about: :class:`EstimateSettings`, validated when it is made.

Each field's ``metadata["help"]`` is also the help of its ``spp-peft estimate`` flag
(:func:`spp_peft.estimate.command.add_estimate_arguments` generates the flags from the fields), so the API
and the command line cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Union

import torch

from spp_peft._utils import parse_dtype

__all__ = ["EstimateSettings", "METHODS", "SHARDINGS", "OPTIMIZERS", "ATTENTIONS", "QUANTIZATIONS", "split_targets"]

METHODS = ("spp", "lora", "full")
QUANTIZATIONS = ("none", "4bit", "8bit")
SHARDINGS = ("none", "fsdp", "zero3")
OPTIMIZERS = ("adamw", "sgd")
ATTENTIONS = ("sdpa", "eager")

_POSITIVE = ("batch_size", "seq_len", "devices", "r", "grad_accumulation_steps")


def split_targets(text: Optional[str]) -> Optional[Union[list[str], str]]:
    """``--target-modules`` as ``target_modules``: comma-separated names, or ``all`` / ``all-linear`` as is."""
    if not text or text in ("all-linear", "all"):
        return text or None
    return [name.strip() for name in text.split(",") if name.strip()]


@dataclass
class EstimateSettings:
    """The inputs of :func:`~spp_peft.estimate.estimate_memory`; ``ValueError`` on a value that makes no sense.

    From Python, ``model`` may also be a transformers config, a dict of config fields or a
    :class:`~spp_peft.estimate.shape.ModelShape` (to reuse one), and ``target_modules`` follows PEFT: a
    list names modules by full name or dotted suffix, a string is a regex matching whole names.

    ``dtype`` and ``compute_dtype`` are normalised to ``torch.dtype``; ``compute_dtype=None`` computes in
    ``dtype`` (see :attr:`compute_torch_dtype`).
    """

    model: Any = field(default="smollm2", metadata={
        "help": "'smollm2' (built in), a local model folder or config.json, or a hub id (needs network)"})
    method: str = field(default="spp", metadata={
        "help": "SPP, LoRA, full fine-tuning, or all three side by side (default)",
        "choices": METHODS, "cli_choices": ("all",) + METHODS, "cli_default": "all"})
    batch_size: int = field(default=1, metadata={"help": "per-device micro-batch (sequences)"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per sequence"})
    dtype: Union[str, torch.dtype] = field(default="bfloat16", metadata={
        "help": "dtype of the stored weights (float32/bfloat16/float16)"})
    compute_dtype: Optional[Union[str, torch.dtype]] = field(default=None, metadata={
        "help": "autocast dtype if different from --dtype"})
    r: int = field(default=16, metadata={"help": "SPP row groups / LoRA rank"})
    target_modules: Optional[Union[Sequence[str], str]] = field(default=None, metadata={
        "help": "comma-separated module names, or 'all-linear' (default: the architecture's SPP targets)",
        "parse": split_targets})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "keep only each block's input, recompute the block in backward"})
    devices: int = field(default=1, metadata={"help": "data-parallel devices in total (all nodes)"})
    sharding: str = field(default="none", metadata={
        "help": "none (single device or DDP), fsdp (FULL_SHARD / FSDP2) or zero3 (DeepSpeed)",
        "choices": SHARDINGS})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (two fp32 states per trainable parameter) or sgd (none)", "choices": OPTIMIZERS})
    attention: str = field(default="sdpa", metadata={
        "help": "sdpa (flash / memory-efficient kernels) or eager (adds the seq_len^2 attention matrix)",
        "choices": ATTENTIONS})
    chunk_rows: Optional[int] = field(default=None, metadata={
        "help": "SPP kernel row chunking (SPPConfig.chunk_rows)"})
    grad_accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; above 1 every gradient stays alive through backward"})
    overhead_gib: float = field(default=0.0, metadata={"help": "fixed per-device runtime overhead to add"})
    quantization: str = field(default="none", metadata={
        "help": "frozen base of the decoder blocks' linears: none, 4bit (bitsandbytes NF4/FP4, QLoRA-style) or "
                "8bit (LLM.int8); --dtype is then the other weights', --compute-dtype the matmuls'",
        "choices": QUANTIZATIONS})
    double_quant: bool = field(default=False, metadata={
        "help": "4bit: quantize the block scales too (bnb_4bit_use_double_quant)"})

    def __post_init__(self) -> None:
        for spec in fields(self):
            choices = spec.metadata.get("choices")
            if choices and getattr(self, spec.name) not in choices:
                raise ValueError(f"{spec.name} must be one of {choices}, got {getattr(self, spec.name)!r}")
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive integer or None, got {self.chunk_rows!r}")
        overhead = self.overhead_gib
        if not (isinstance(overhead, (int, float)) and math.isfinite(overhead) and overhead >= 0):
            raise ValueError(f"overhead_gib must be a finite number >= 0, got {self.overhead_gib!r}")
        if self.sharding != "none" and self.devices < 2:
            raise ValueError(f"sharding={self.sharding!r} needs devices >= 2")
        if self.quantization != "none" and (self.method == "full" or self.sharding != "none"):
            raise ValueError(f"quantization={self.quantization!r} is for adapters (spp, lora) on one device "
                             f"or DDP, not method={self.method!r} with sharding={self.sharding!r}")
        self.dtype = parse_dtype(self.dtype)
        if self.compute_dtype is not None:
            self.compute_dtype = parse_dtype(self.compute_dtype)

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        """The dtype of the forward and backward: ``compute_dtype``, else ``dtype``."""
        return self.compute_dtype if self.compute_dtype is not None else self.dtype

    @property
    def shards(self) -> int:
        """How many devices share each parameter, gradient and optimizer state (1 without sharding)."""
        return self.devices if self.sharding != "none" else 1

    @property
    def tokens(self) -> int:
        """Tokens of the per-device micro-batch."""
        return self.batch_size * self.seq_len
