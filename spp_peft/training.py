"""Fine-tuning a pruned model with transformers' ``Trainer``: SPP and the baselines it is compared with.

Methods (all trained on the same data with the same budget, so that comparisons are honest):

``spp``
    SPP (Lu et al., ICML 2024, arXiv:2405.16057): ``W' = W * (1 + s * B A)``; the pruned zeros stay zero
    by construction through training, merging and export.
``lora_star``
    The paper's LoRA* baseline: plain LoRA (Hu et al., 2021) is trained, merged (which fills the pruned
    zeros), then the merged weight is *re-masked* with the base's zero mask.
``masked_lora``
    LoRA whose update is masked during training and merging, ``W + s * (B A) * M`` with ``M`` the base's
    non-zero mask: SQFT's SparsePEFT (Munoz et al., 2024, arXiv:2410.03750). Implemented as a PEFT LoRA
    *variant* (:class:`MaskedLoraVariant`), so PEFT's forward, merge, unmerge and save all go through it.
``none``
    No fine-tuning: the pruned model as it is.

Data: plain text for language modelling (non-overlapping windows, every token in the loss), or
instruction records rendered with the Alpaca template or the tokenizer's chat template, with the
reference's ``train_on_inputs`` option (see :mod:`spp_peft.data`).

The public entry points are :func:`prepare_model` (wrap a pruned model for a method), :func:`train`
(run the ``Trainer``: progress bar, logging, checkpoints and resume, gradient checkpointing, the adapter
saved with its model card), :func:`merge` (the merged, re-masked where needed, plain model) and
:func:`load_trained` (a saved adapter back onto its base).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from spp_peft._utils import atomic_write_dir, atomic_write_file, exclusive
from spp_peft.sparsity import as_out_in, zero_mask

logger = logging.getLogger(__name__)

METHODS = ("spp", "lora_star", "masked_lora", "none")
#: Methods that train an adapter.
TRAINED_METHODS = ("spp", "lora_star", "masked_lora")
#: The paper's targets for LLaMA: every attention and MLP projection.
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: Written next to every saved adapter: which method trained it (decides how it is loaded and merged).
METHOD_FILE = "spp_peft_training.json"
#: The LoRA variant key under which :class:`MaskedLoraVariant` keeps the base's non-zero mask.
MASK_BUFFER = "masked_lora_keep"


# ----------------------------------------------------------------------------------------- settings


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
        default=True, metadata={"help": "Instruction formats: include the prompt tokens in the loss (reference default)."}
    )
    add_eos: bool = field(default=True, metadata={"help": "Instruction formats: end each response with EOS."})
    max_samples: Optional[int] = field(
        default=None, metadata={"help": "Keep at most this many windows / records (None = all)."}
    )

    def validate(self) -> None:
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
    """

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

    def validate(self) -> None:
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
        _check_choice("train.optim", self.optim, "transformers.training_args", "OptimizerNames")
        _check_choice("train.lr_scheduler", self.lr_scheduler, "transformers.trainer_utils", "SchedulerType")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_choice(key: str, value: str, module: str, enum: str) -> None:
    """``value`` must be a member of the transformers enum that ``TrainingArguments`` checks it against
    (checked here, before any work, rather than when the Trainer is built after pruning)."""
    import importlib

    choices = [member.value for member in getattr(importlib.import_module(module), enum)]
    if value not in choices:
        from spp_peft.errors import quote

        raise ValueError(f"{key}: unknown value {quote(value)}; choose one of {', '.join(choices)}")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown fine-tuning method {method!r}; choose one of {METHODS}")
    return method


# ------------------------------------------------------------------------------------------- data


class TokenDataset(torch.utils.data.Dataset):
    """A list of ``{"input_ids", "labels"}`` examples (lists or 1-D tensors) for the ``Trainer``."""

    def __init__(self, examples: Sequence[dict]):
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    @property
    def num_tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def build_dataset(tokenizer, data: DataConfig) -> TokenDataset:
    """The training examples described by ``data`` (see :class:`DataConfig`)."""
    from spp_peft import data as spp_data

    data.validate()
    if data.format == "text":
        windows = spp_data.lm_windows(tokenizer, spp_data.load_texts(data.source, data.text_field), data.cutoff_len)
        if data.max_samples is not None:
            windows = windows[: data.max_samples]
        examples = [{"input_ids": w, "labels": w} for w in windows]
    else:
        records = spp_data.load_records(data.source, data.max_samples)
        examples = [
            spp_data.tokenize_instruction(
                tokenizer, r, data.format, data.cutoff_len, data.train_on_inputs, data.add_eos
            )
            for r in records
        ]
        examples = [e for e in examples if any(label != spp_data.IGNORE_INDEX for label in e["labels"][1:])]
    if not examples:
        raise ValueError(f"no training examples from data.source={data.source!r} (format {data.format!r})")
    return TokenDataset(examples)


class PadCollator:
    """Right-pads a batch: ``input_ids`` with the pad id, ``labels`` with -100, plus the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, batch: Sequence[dict]) -> dict:
        from spp_peft.data import IGNORE_INDEX

        length = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[i, :n] = torch.as_tensor(example["input_ids"])
            labels[i, :n] = torch.as_tensor(example["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def _pad_id(tokenizer) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0


# ---------------------------------------------------------------------------- masked LoRA (SparsePEFT)


def _masked_lora_variant_class():
    from peft.tuners.lora.layer import LoraVariant

    class MaskedLoraVariant(LoraVariant):
        """LoRA with the update masked by the base's non-zero mask: ``W + s * (B A) * M`` (SQFT's SparsePEFT).

        ``M`` (``module.masked_lora_keep``, bool, the base weight's layout) is captured from the frozen base
        when the variant is attached; forward, merge and unmerge all use the same masked delta, so a merge
        keeps every zero of the base (``0 + 0 = 0`` exactly).
        """

        def supports_lora_conversion(self) -> bool:
            return False

        @staticmethod
        def init(module, adapter_name: str, **kwargs) -> None:  # attached after injection, see attach
            pass

        @staticmethod
        def masked_delta(module, adapter: str) -> torch.Tensor:
            """``s * (B A) * M`` in the base weight's stored layout."""
            keep = getattr(module, MASK_BUFFER)
            return module.get_delta_weight(adapter) * keep.to(module.lora_B[adapter].weight.dtype)

        @staticmethod
        def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight + MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
            orig_weight.data += MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
            return orig_weight - MaskedLoraVariant.masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
            weight_a = module.lora_A[active_adapter].weight
            weight_b = module.lora_B[active_adapter].weight
            keep = as_out_in(getattr(module, MASK_BUFFER), module.fan_in_fan_out)
            delta = (weight_b @ weight_a) * keep.to(weight_a.dtype) * module.scaling[active_adapter]
            x = module.lora_dropout[active_adapter](x)
            return result + F.linear(x.to(delta.dtype), delta).to(result.dtype)

    return MaskedLoraVariant


def attach_masked_lora(peft_model: nn.Module) -> int:
    """Turn the LoRA layers of ``peft_model`` into masked LoRA (see :class:`MaskedLoraVariant`).

    The base weights must be the pruned ones (frozen, unmerged). Returns the number of layers changed.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    variant_cls = _masked_lora_variant_class()
    count = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLinear):
            continue
        if module.merged:
            raise RuntimeError("attach_masked_lora: the LoRA layers are merged; attach before merging")
        keep = ~zero_mask(module.get_base_layer().weight.detach())
        module.register_buffer(MASK_BUFFER, keep, persistent=False)
        for adapter in module.lora_A:
            module.lora_variant[adapter] = variant_cls()
        count += 1
    if count == 0:
        raise ValueError("attach_masked_lora: the model has no LoRA linear layer")
    return count


# ----------------------------------------------------------------------------------- model set-up


def peft_config(method: str, cfg: TrainConfig):
    """The PEFT config of a trained method (:class:`spp_peft.SPPConfig` or ``peft.LoraConfig``)."""
    check_method(method)
    if method == "none":
        raise ValueError("method 'none' trains nothing and has no adapter config")
    if method == "spp":
        from spp_peft import SPPConfig

        return SPPConfig(r=cfg.r, spp_alpha=cfg.alpha, spp_dropout=cfg.dropout,
                         target_modules=list(cfg.target_modules), task_type="CAUSAL_LM")
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")


def prepare_model(model: nn.Module, method: str, cfg: TrainConfig) -> nn.Module:
    """Wrap a pruned model for ``method``: a ``PeftModel`` with the adapter (``none``: the model itself).

    The adapter init is seeded with ``cfg.seed``; the base weights are frozen.
    """
    check_method(method)
    cfg.validate()
    if method == "none":
        return model
    import spp_peft  # noqa: F401  (registers SPP with PEFT)
    from peft import get_peft_model

    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, peft_config(method, cfg))
    if method == "masked_lora":
        attach_masked_lora(peft_model)
    return peft_model


# ----------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """What :func:`train` did: the trained ``model`` (a ``PeftModel``), where its adapter is, and its log."""

    method: str
    model: Any
    adapter_dir: Optional[str]
    log_history: list[dict]
    steps: int
    seconds: float
    tokens: int
    lr: float
    examples: int
    resumed_from: Optional[str] = None

    @property
    def losses(self) -> list[tuple[int, float]]:
        """``(step, training loss)`` of every logged step."""
        return [(int(e["step"]), float(e["loss"])) for e in self.log_history if "loss" in e and "step" in e]

    def summary(self) -> dict:
        losses = self.losses
        return {
            "method": self.method,
            "adapter_dir": self.adapter_dir,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "seconds_per_step": round(self.seconds / self.steps, 3) if self.steps else None,
            "tokens": self.tokens,
            "lr": self.lr,
            "examples": self.examples,
            "resumed_from": self.resumed_from,
            "first_loss": losses[0][1] if losses else None,
            "final_loss": losses[-1][1] if losses else None,
            "losses": losses,
        }


def training_arguments(cfg: TrainConfig, output_dir: Union[str, os.PathLike], lr: Optional[float] = None):
    """``transformers.TrainingArguments`` for ``cfg`` (checkpoints go to ``output_dir``)."""
    from transformers import TrainingArguments

    save = cfg.save_steps > 0
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; use what this version has.
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    checkpointing = {ckpt: cfg.gradient_checkpointing,
                     f"{ckpt}_kwargs": {"use_reentrant": False} if cfg.gradient_checkpointing else None}
    return TrainingArguments(
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
        **checkpointing,
        bf16=cfg.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=not cfg.progress,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def last_checkpoint(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The newest ``checkpoint-N`` folder under ``folder``, or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if os.path.isdir(folder) else None


def train(
    model: nn.Module,
    tokenizer,
    method: str,
    dataset: TokenDataset,
    cfg: TrainConfig,
    output_dir: Union[str, os.PathLike],
    lr: Optional[float] = None,
    data_description: Optional[dict] = None,
    callbacks: Optional[list] = None,
) -> TrainResult:
    """Fine-tune a model prepared by :func:`prepare_model` with transformers' ``Trainer``.

    Writes under ``output_dir``: ``checkpoints/`` (every ``cfg.save_steps`` steps; with ``cfg.resume`` a
    later call continues from the newest one), ``adapter/`` (the final adapter, its model card and
    :data:`METHOD_FILE`) and ``train_log.json`` (the Trainer's log history).

    Args:
        lr: learning rate for this method (defaults to ``cfg.lr``).
        data_description: recorded in :data:`METHOD_FILE` and the model card (e.g. the data config).
        callbacks: extra ``transformers.TrainerCallback`` objects.

    Raises:
        OutputBusyError: another training is writing into ``output_dir`` right now.
    """
    check_method(method)
    with exclusive(output_dir) as out:
        return _train(model, tokenizer, method, dataset, cfg, out, lr, data_description, callbacks)


def _train(model, tokenizer, method, dataset, cfg, out: Path, lr, data_description, callbacks) -> TrainResult:
    from transformers import Trainer

    out.mkdir(parents=True, exist_ok=True)
    lr = cfg.lr if lr is None else float(lr)
    if method == "none":
        return TrainResult(method, model, None, [], 0, 0.0, 0, lr, len(dataset))

    ckpt_dir = out / "checkpoints"
    args = training_arguments(cfg, ckpt_dir, lr)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PadCollator(_pad_id(tokenizer)),
        callbacks=[*(callbacks or []), _divergence_guard()],
    )
    resume = _prepare_checkpoints(ckpt_dir, _run_identity(method, cfg, lr, dataset, data_description), cfg.resume)
    if resume:
        logger.info("%s: resuming from %s", method, resume)
    logger.info(
        "%s: training %d trainable parameters, lr=%g, %s steps of %d x %d sequences",
        method, sum(p.numel() for p in model.parameters() if p.requires_grad), lr,
        cfg.max_steps if cfg.max_steps > 0 else f"{cfg.epochs:g} epoch(s) of", cfg.batch_size, cfg.grad_accum,
    )
    start = time.perf_counter()
    finished = _finished_state(resume) if resume else None
    if finished is not None:
        # The checkpoint is the end of this very run: load it. (Trainer would run one step past max_steps.)
        _load_adapter_weights(model, resume)
        steps, history = int(finished["global_step"]), [dict(e) for e in finished.get("log_history", [])]
    else:
        trainer.train(resume_from_checkpoint=resume)
        steps, history = int(trainer.state.global_step), [dict(e) for e in trainer.state.log_history]
    seconds = time.perf_counter() - start
    model.eval()
    _check_finite(model, method, lr, steps)
    tokens = _tokens_seen(dataset, steps * cfg.batch_size * cfg.grad_accum)
    result = TrainResult(method, model, None, history, steps, seconds, tokens, lr, len(dataset), resume)
    result.adapter_dir = str(save_adapter(model, out / "adapter", method, cfg, lr, result, data_description))
    atomic_write_file(out / "train_log.json", json.dumps(history, indent=1) + "\n")
    return result


def _non_finite_param(model: nn.Module) -> Optional[str]:
    """The first trainable parameter holding NaN or inf, or ``None``."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


def _divergence_guard():
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        """Stop at the first step that leaves a non-finite trainable weight: the run is lost, and the rest of
        the budget would be spent on NaNs (the Trainer's logged loss hides them: logging_nan_inf_filter)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and _non_finite_param(model) is not None:
                control.should_training_stop = True
            return control

    return DivergenceGuard()


def _check_finite(model: nn.Module, method: str, lr: float, steps: int) -> None:
    """Refuse to save trained weights that hold NaN or inf (a diverged run): nothing useful can be merged."""
    name = _non_finite_param(model)
    if name is not None:
        from spp_peft.errors import TrainingDiverged

        raise TrainingDiverged(f"{method}: training produced non-finite adapter weights ({name}) by step {steps} "
                               f"with lr={lr:g}; nothing was saved: lower the learning rate")


#: Settings that do not change what a run computes; a checkpoint may be resumed across changes of these.
_VOLATILE = ("progress", "resume", "save_steps", "save_total_limit", "logging_steps")
_IDENTITY_FILE = "spp_peft_run.json"


def _settings_identity(method: str, cfg: TrainConfig, lr: float, data: Optional[dict]) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _VOLATILE}
    return json.loads(json.dumps({"method": method, "lr": lr, "train": settings, "data": data}, default=str))


def _run_identity(method: str, cfg: TrainConfig, lr: float, dataset: TokenDataset, data: Optional[dict]) -> dict:
    return {**_settings_identity(method, cfg, lr, data), "examples": len(dataset), "tokens": dataset.num_tokens}


def is_resume(output_dir: Union[str, os.PathLike], method: str, cfg: TrainConfig, lr: Optional[float] = None,
              data: Optional[dict] = None) -> bool:
    """Whether :func:`train` into ``output_dir`` would continue a run of the same settings (``cfg.resume``
    and the folder's run record agrees), checked without loading anything: what lets a command rerun into
    its own non-empty output folder."""
    marker = Path(output_dir) / "checkpoints" / _IDENTITY_FILE
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if not cfg.resume or not isinstance(previous, dict):
        return False
    recorded = {k: v for k, v in previous.items() if k not in ("examples", "tokens")}
    return recorded == _settings_identity(method, cfg, cfg.lr if lr is None else float(lr), data)


def _prepare_checkpoints(ckpt_dir: Path, identity: dict, resume: bool) -> Optional[str]:
    """The checkpoint to resume from: the newest one, if ``resume`` and it was made with the same settings.

    Otherwise old checkpoints are removed (those of a run with other settings: another method, learning
    rate, budget or data), so a rerun never silently continues someone else's training.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker = ckpt_dir / _IDENTITY_FILE
    previous = json.loads(marker.read_text()) if marker.is_file() else None
    checkpoint = _last_complete_checkpoint(ckpt_dir)
    if checkpoint and (not resume or previous != identity):
        if resume:
            logger.warning("%s holds checkpoints of a run with other settings: starting afresh", ckpt_dir)
        for old in ckpt_dir.glob("checkpoint-*"):
            shutil.rmtree(old, ignore_errors=True)
        checkpoint = None
    atomic_write_file(marker, json.dumps(identity, indent=1) + "\n")
    return checkpoint


def _last_complete_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """The newest checkpoint that the Trainer finished writing. The Trainer writes ``checkpoint-N`` in place
    and ``trainer_state.json`` last; a folder without a readable one is what a crash (kill -9, full disk)
    left mid-save: it is removed, and the checkpoint before it is used."""
    while True:
        checkpoint = last_checkpoint(ckpt_dir)
        if checkpoint is None:
            return None
        try:
            json.loads((Path(checkpoint) / "trainer_state.json").read_text())
            return checkpoint
        except (OSError, ValueError):
            logger.warning("%s is incomplete (interrupted while saving): removed", checkpoint)
            shutil.rmtree(checkpoint, ignore_errors=True)


def _finished_state(checkpoint: str) -> Optional[dict]:
    """The Trainer state of ``checkpoint`` if it is the last step of its run, else ``None``."""
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    done = state.get("max_steps") and int(state.get("global_step", 0)) >= int(state["max_steps"])
    return state if done else None


def _load_adapter_weights(model: nn.Module, checkpoint: str) -> None:
    """Load the adapter weights a Trainer checkpoint holds into ``model`` (a ``PeftModel``), exactly."""
    from peft import set_peft_model_state_dict

    from spp_peft._utils.tensors import load_safetensors_folder

    state = load_safetensors_folder(checkpoint, "adapter_model*.safetensors")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model: {unexpected[:3]}")


def _tokens_seen(dataset: TokenDataset, sequences: int) -> int:
    if not len(dataset):
        return 0
    mean = dataset.num_tokens / len(dataset)
    return int(round(mean * sequences))


def save_adapter(
    model: nn.Module,
    folder: Union[str, os.PathLike],
    method: str,
    cfg: TrainConfig,
    lr: float,
    result: Optional[TrainResult] = None,
    data_description: Optional[dict] = None,
    overwrite: bool = True,
) -> Path:
    """Save the adapter (PEFT ``save_pretrained``, with its model card) plus :data:`METHOD_FILE`, atomically
    (:func:`spp_peft._utils.atomic_write_dir`; ``overwrite=False`` refuses an existing adapter)."""
    from spp_peft import __version__

    folder = Path(folder)
    info = {
        "method": method,
        "lr": lr,
        "train": asdict(cfg),
        "data": data_description,
        "result": {k: v for k, v in result.summary().items() if k not in ("losses", "adapter_dir")} if result else None,
        "spp_peft_version": __version__,
    }
    # Written whole into a temporary sibling and renamed: weights, config, card and METHOD_FILE always match.
    with atomic_write_dir(folder, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp))
        (tmp / METHOD_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _append_card(tmp / "README.md", method, cfg, lr, result, data_description, folder.name)
    return folder


_METHOD_TEXT = {
    "spp": "SPP (sparsity-preserved): merging keeps the base's zeros by construction.",
    "lora_star": "LoRA* baseline: plain LoRA; the merged weight must be re-masked with the base's zero mask "
                 "(`spp_peft.training.merge` does it).",
    "masked_lora": "Masked LoRA (SQFT's SparsePEFT): the update is `s * (B A) * M`; load it with "
                   "`spp_peft.training.load_trained`, which re-attaches the mask.",
}


def _append_card(path: Path, method: str, cfg: TrainConfig, lr: float, result: Optional[TrainResult],
                 data: Optional[dict], adapter_name: str) -> None:
    lines = [
        "", "## Training (spp-peft)", "",
        f"- method: `{method}`. {_METHOD_TEXT.get(method, '')}",
        f"- r={cfg.r}, alpha={cfg.alpha:g} (s={cfg.scaling:g}), targets: {', '.join(cfg.target_modules)}",
        f"- lr={lr:g}, scheduler={cfg.lr_scheduler}, warmup={cfg.warmup:g}, weight decay={cfg.weight_decay:g}, "
        f"batch={cfg.batch_size}x{cfg.grad_accum}",
    ]
    if data:
        lines.append("- data: " + ", ".join(f"{k}={v}" for k, v in data.items()))
    if result is not None:
        summary = result.summary()
        lines.append(f"- {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['seconds']:.0f} s; "
                     f"loss {summary['first_loss']} -> {summary['final_loss']}")
    lines.append(f"- load and merge: `spp-peft merge --model BASE --adapter {adapter_name} --output OUT`")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(text.rstrip("\n") + "\n" + "\n".join(lines) + "\n", encoding="utf-8")  # in the temporary folder


# ------------------------------------------------------------------------------------ merge and load


def read_method(adapter_dir: Union[str, os.PathLike]) -> str:
    """The method that trained the adapter in ``adapter_dir`` (from :data:`METHOD_FILE`, else its PEFT type)."""
    folder = Path(adapter_dir)
    info = folder / METHOD_FILE
    if info.is_file():
        return check_method(json.loads(info.read_text())["method"])
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder} is not an adapter folder (no adapter_config.json)")
    peft_type = str(json.loads(config.read_text()).get("peft_type", "")).upper()
    if peft_type == "SPP":
        return "spp"
    if peft_type == "LORA":
        # A plain LoRA adapter from elsewhere: merging it into a pruned base needs the LoRA* re-mask.
        return "lora_star"
    raise ValueError(f"{folder}: adapter type {peft_type!r} is not one spp-peft can merge sparsely")


def load_trained(base_model: nn.Module, adapter_dir: Union[str, os.PathLike], is_trainable: bool = False):
    """Load a saved adapter onto its (pruned) base; returns ``(peft_model, method)``."""
    method = read_method(adapter_dir)
    if method == "spp":
        from spp_peft import load_adapter

        return load_adapter(base_model, str(adapter_dir), is_trainable=is_trainable), method
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    if method == "masked_lora":
        attach_masked_lora(model)
    return model, method


@torch.no_grad()
def remask(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero ``model``'s linear weights where ``masks`` (``{module name: zero mask}``) is True; the count reset."""
    reset = 0
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        reset += int((weight[mask] != 0).sum().item())
        weight.masked_fill_(mask.to(weight.device), 0)
    return reset


def merge(model: nn.Module, method: str) -> nn.Module:
    """The plain merged model of a trained method (the adapter folded into the weights).

    ``spp``: PEFT's ``merge_and_unload`` (the tuner checks the zero sets); ``masked_lora``: the masked
    update is merged, which keeps the zeros; ``lora_star``: LoRA is merged, then re-masked with the base's
    zero mask (captured from the frozen base just before merging); ``none``: the model unchanged.
    """
    check_method(method)
    if method == "none":
        return model
    masks = {}
    if method == "lora_star":
        from peft.tuners.lora.layer import LoraLayer

        prefix = "base_model.model."
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                key = name[len(prefix):] if name.startswith(prefix) else name
                masks[key] = zero_mask(module.get_base_layer().weight.detach())
    merged = model.merge_and_unload()
    if method == "lora_star":
        reset = remask(merged, masks)
        logger.info("lora_star: re-masking reset %d merged weights to zero", reset)
    merged.eval()
    return merged
