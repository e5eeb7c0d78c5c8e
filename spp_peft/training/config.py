"""The settings of the training stage (the recipe's ``data:`` and ``train:`` sections), checked when built.

Light on purpose: the recipe and the CLI build their schema from these dataclasses, so this module imports
neither torch, transformers' Trainer nor peft at module level.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

METHODS = ("spp", "lora_star", "masked_lora", "none")
#: Methods that train an adapter.
TRAINED_METHODS = ("spp", "lora_star", "masked_lora")
#: The paper's targets for LLaMA: every attention and MLP projection.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: ``torch.finfo(torch.float32).max``: the scale s = alpha / r must stay finite in float32.
_FLOAT32_MAX = 3.4028234663852886e38


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    return method


@dataclass
class DataConfig:
    """Training data (the recipe's ``data:`` section)."""

    source: str = field(
        default="builtin",
        metadata={"help": "Text source (see spp_peft.data.load_texts) for format 'text'; instruction records "
                          "(spp_peft.data.load_records: builtin:instructions, .json/.jsonl, hub id) otherwise."},
    )
    format: str = field(default="text", metadata={"help": "'text' (language modelling), 'alpaca' or 'chat'."})
    text_field: str = field(default="text", metadata={"help": "Field holding the text in JSON / hub datasets."})
    cutoff_len: int = field(
        default=256, metadata={"help": "Tokens per training window (text) or maximum sequence length (instructions)."}
    )
    train_on_inputs: bool = field(
        default=True,
        metadata={"help": "Instruction formats: include the prompt tokens in the loss (reference default); false "
                          "trains the response only: the Alpaca output, or every assistant turn of a chat (TRL's "
                          "assistant_only_loss)."},
    )
    add_eos: Optional[bool] = field(
        default=None,
        metadata={"help": "End each example with the tokenizer's EOS where it does not already: each document "
                          "(text), each response (alpaca), each conversation (chat). null = the format's convention: "
                          "alpaca yes, text no (the WikiText protocol), chat as its template renders it."},
    )
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many windows / records (None = all)."}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no training could use (also called again after edits)."""
        from spp_peft.data import TRAIN_FORMATS

        if self.format not in TRAIN_FORMATS:
            raise ValueError(f"data.format must be one of {TRAIN_FORMATS}, got {self.format!r}")
        if self.cutoff_len < 2:
            raise ValueError(f"data.cutoff_len must be >= 2, got {self.cutoff_len}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"data.max_samples must be >= 1 or null, got {self.max_samples}")


@dataclass
class TrainConfig:
    """Adapter and optimisation settings shared by every method (the recipe's ``train:`` section).

    ``alpha`` is ``spp_alpha`` for SPP and ``lora_alpha`` for the LoRA baselines, so ``s = alpha / r`` is the
    same scale for all (the paper: r=16, alpha=32, s=2).

    In recipes and flags the keys that ``TrainingArguments`` also has go by its names (:attr:`ALIASES`:
    ``learning_rate``, ``per_device_train_batch_size``, ...); the short field names stay accepted. ``args``
    passes any other ``TrainingArguments`` field through (checked by :mod:`spp_peft.training.arguments`).
    """

    #: ``{TrainingArguments name: field}``: the primary spelling in recipes and flags, the field the alias.
    ALIASES: ClassVar[dict[str, str]] = {
        "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
        "gradient_accumulation_steps": "grad_accum", "warmup_steps": "warmup", "lr_scheduler_type": "lr_scheduler",
    }
    #: Keys of a ``train:`` mapping that are neither fields nor aliases go into this field (checked later).
    EXTRA_KEYS: ClassVar[str] = "args"

    r: int = field(default=16, metadata={"help": "SPP row groups / LoRA rank (paper: 16)."})
    alpha: float = field(default=32.0, metadata={"help": "spp_alpha / lora_alpha; scale s = alpha / r (paper: 32)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter branch's input."})
    target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "Module name suffixes to adapt."}
    )
    lr: float = field(default=4e-3, metadata={"help": "Peak learning rate (paper: 4e-3 for 7B)."})
    epochs: float = field(default=3.0, metadata={"help": "Training epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides epochs."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per forward pass (per device)."})
    grad_accum: int = field(default=1, metadata={"help": "Gradient accumulation steps (global batch = batch_size x this)."})
    warmup: float = field(default=0.03, metadata={"help": "Warm-up: a ratio of the steps if < 1, else a step count."})
    weight_decay: float = field(default=0.001, metadata={"help": "AdamW weight decay (paper: 0.001)."})
    lr_scheduler: str = field(default="linear", metadata={"help": "transformers scheduler name (linear, cosine, constant, ...)."})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 = off)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    bf16: bool = field(default=False, metadata={"help": "bfloat16 autocast (GPU / recent CPUs)."})
    logging_steps: int = field(default=1, metadata={"help": "Log the loss every this many steps."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every this many steps (0 = only the final adapter)."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept."})
    resume: bool = field(default=True, metadata={"help": "Resume from the last checkpoint in the output folder."})
    seed: int = field(default=0, metadata={"help": "Seed of the adapter init and of the data order."})
    progress: bool = field(default=True, metadata={"help": "Show the Trainer's progress bar."})
    args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Any other transformers.TrainingArguments field, passed through "
                          "(e.g. {report_to: tensorboard, label_smoothing_factor: 0.1}); checked before any work."},
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for settings no training could use (also called again after edits)."""
        # `x > 0` alone lets NaN and inf through, which train silently into an all-NaN adapter.
        finite = math.isfinite
        checks = [
            (self.r >= 1, f"train.r must be >= 1, got {self.r}"),
            (finite(self.alpha) and 0 < self.alpha / max(self.r, 1) < _FLOAT32_MAX,
             f"train.alpha must be a finite number > 0 (alpha / r finite in float32), got {self.alpha}"),
            (0 <= self.dropout < 1, f"train.dropout must be in [0, 1), got {self.dropout}"),
            (finite(self.lr) and self.lr > 0, f"train.lr must be a finite number > 0, got {self.lr}"),
            (finite(self.epochs), f"train.epochs must be finite, got {self.epochs}"),
            (self.max_steps > 0 or self.epochs > 0, "train: set max_steps > 0 or epochs > 0"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1"),
            (finite(self.warmup) and self.warmup >= 0, f"train.warmup must be a finite number >= 0, got {self.warmup}"),
            (bool(self.target_modules), "train.target_modules must name at least one module"),
            (self.logging_steps >= 1 and self.save_steps >= 0, "train.logging_steps >= 1 and save_steps >= 0"),
            (finite(self.weight_decay) and self.weight_decay >= 0,
             f"train.weight_decay must be a finite number >= 0, got {self.weight_decay}"),
            (finite(self.max_grad_norm) and self.max_grad_norm >= 0,
             f"train.max_grad_norm must be a finite number >= 0, got {self.max_grad_norm}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        _check_choice("train.optim", self.optim, "adamw_torch", "transformers.training_args", "OptimizerNames")
        _check_choice("train.lr_scheduler", self.lr_scheduler, "linear", "transformers.trainer_utils", "SchedulerType")
        if self.args:  # only then is transformers imported: a recipe without pass-through stays light
            from .arguments import check_args

            check_args(self)

    @property
    def scaling(self) -> float:
        from spp_peft.kernel import scaling

        return scaling(self.alpha, self.r)


def _check_choice(key: str, value: str, default: str, module: str, enum: str) -> None:
    """``value`` must be a member of the transformers enum that ``TrainingArguments`` checks it against
    (checked here, before any work, rather than when the Trainer is built after pruning). The default is a
    member: building a default config need not import transformers."""
    if value == default:
        return
    choices = [member.value for member in getattr(importlib.import_module(module), enum)]
    if value not in choices:
        from spp_peft.errors import quote

        raise ValueError(f"{key}: unknown value {quote(value)}; choose one of {', '.join(choices)}")
