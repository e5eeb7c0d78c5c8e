"""``transformers.TrainingArguments`` from a :class:`~spp_peft.training.TrainConfig`, and the checks of its
pass-through ``args`` (any other ``TrainingArguments`` field), run before any work.

The check is the real thing: names against ``TrainingArguments``' fields (a typo gets a "did you mean"),
values against their field types, then ``TrainingArguments`` itself is built once, exactly as training will
build it, so whatever it refuses (an unknown ``eval_strategy``, conflicting settings) is refused here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from typing import Any, Optional, Union

from spp_peft.errors import quote

from .config import TrainConfig

#: TrainingArguments fields that the run decides (where checkpoints go; the model's extra dataset columns).
RESERVED = ("output_dir", "remove_unused_columns")


def hf_fields() -> dict[str, Any]:
    """``{name: type}`` of every ``TrainingArguments`` field (imports transformers)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(TrainingArguments) if f.init}


def training_arguments(cfg: TrainConfig, output_dir: Union[str, os.PathLike], lr: Optional[float] = None):
    """``transformers.TrainingArguments`` for ``cfg`` (checkpoints go to ``output_dir``); ``cfg.args`` win
    over the defaults set here (``report_to="none"``, ``disable_tqdm``, ...)."""
    import torch
    from transformers import TrainingArguments

    from spp_peft._utils.progress import progress_enabled

    save = cfg.save_steps > 0
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; use what this version has.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in hf_fields() else "gradient_checkpointing"
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr if lr is None else lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        warmup_steps=cfg.warmup if cfg.warmup < 1 else int(cfg.warmup),
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=cfg.save_steps if save else 500,
        save_total_limit=cfg.save_total_limit,
        seed=cfg.seed,
        data_seed=cfg.seed,
        **{ckpt: cfg.gradient_checkpointing,
           f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None},
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        # Off with -q, TQDM_DISABLE=1 or transformers' disable_progress_bar(), which the Trainer ignores.
        disable_tqdm=not (cfg.progress and progress_enabled()),
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    values.update(cfg.args)
    return TrainingArguments(**values)


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether ``value`` (YAML data) fits the field type ``tp``; enums take their string values."""
    import enum

    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Union or type(tp).__name__ == "UnionType":
        return any(_type_ok(value, option) for option in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}
    if origin in (list, dict):
        return isinstance(value, origin)
    return True  # a type YAML cannot express: TrainingArguments itself decides below


def check_args(cfg: TrainConfig, where: str = "train.args") -> None:
    """Refuse, with one line naming the key, what ``TrainingArguments`` would not take from ``cfg.args``."""
    fields = hf_fields()
    ours = TrainConfig.ALIASES | {f.name: f.name for f in dataclasses.fields(TrainConfig) if f.name in fields}
    for name, value in cfg.args.items():
        if name in ours:
            raise ValueError(f"{where}.{name}: set train.{name} instead (a train key of its own)")
        if name in RESERVED:
            raise ValueError(f"{where}.{name}: set by the run (checkpoints go to the output folder); remove it")
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hint = f"; did you mean {quote(close[0])}?" if close else ""
            raise ValueError(f"unknown key {where}.{name}{hint} (not a transformers.TrainingArguments field)")
        if not _type_ok(value, fields[name]):
            raise ValueError(f"{where}.{name}: expected {_type_label(fields[name])}, got {quote(value)} "
                             f"({type(value).__name__})")
    with tempfile.TemporaryDirectory() as tmp:  # a dry run: TrainingArguments writes nothing when built
        try:
            training_arguments(cfg, tmp)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: transformers.TrainingArguments refuses {quote(cfg.args)}: {err}") from None


def _type_label(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
