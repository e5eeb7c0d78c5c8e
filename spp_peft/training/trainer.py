"""Fine-tuning with transformers' ``Trainer``: the same data, budget and loop for every method.

:func:`train` runs the ``Trainer`` (progress bar, logging, checkpoints and resume, gradient checkpointing),
stops a diverged run, and saves the adapter with its model card (:func:`~spp_peft.training.save_adapter`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from spp_peft._utils import atomic_write_file, exclusive

from .arguments import training_arguments
from .checkpoints import ResumeFrom, _finished_state, _load_adapter_weights, _prepare_checkpoints, _run_identity
from .config import TrainConfig, check_method
from .dataset import TokenDataset, data_collator
from .methods import save_adapter

logger = logging.getLogger(__name__)


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
    resume_from_checkpoint: ResumeFrom = None,
    overwrite: bool = False,
) -> TrainResult:
    """Fine-tune a model prepared by :func:`~spp_peft.training.prepare_model` with transformers' ``Trainer``.

    Writes under ``output_dir``: ``checkpoints/`` (every ``cfg.save_steps`` steps), ``adapter/`` (the final
    adapter, its model card and :data:`~spp_peft.training.METHOD_FILE`) and ``train_log.json`` (the Trainer's
    log history).

    Resume (:mod:`~spp_peft.training.checkpoints`): with ``cfg.resume`` a later call of the same settings
    continues from the newest checkpoint. Settings equal up to the budget (``max_steps``, ``epochs``) count
    as the same: a grown budget continues the run and keeps every checkpoint; a finished run loads its last
    checkpoint without training again.

    Args:
        lr: learning rate for this method (defaults to ``cfg.lr``).
        data_description: recorded in ``METHOD_FILE`` and the model card (e.g. the data config).
        callbacks: extra ``transformers.TrainerCallback`` objects.
        resume_from_checkpoint: as Trainer's: None (``cfg.resume`` decides), True (the last checkpoint of
            ``output_dir``, which must exist; even with ``cfg.resume`` off) or the path of a checkpoint folder
            (from any run of compatible settings).
        overwrite: delete the checkpoints in ``output_dir`` that this run would not continue (a run of other
            settings, or resuming off) and start afresh; without it they are refused. A run of the same
            settings still resumes.

    Raises:
        OutputBusyError: another training is writing into ``output_dir`` right now.
        CheckpointMismatch: ``output_dir`` holds checkpoints this run would not continue, and no
            ``overwrite`` (nothing was deleted).
        ValueError: ``resume_from_checkpoint`` is a checkpoint of other settings, or past the budget.
        TrainingDiverged: a trainable weight became NaN or inf (nothing is saved).
    """
    check_method(method)
    # Under a multi-process launch (torchrun, accelerate) only rank 0 holds the folder and writes into it.
    hold = exclusive(output_dir) if _launch_rank() == 0 else contextlib.nullcontext(Path(output_dir).expanduser())
    with hold as out:
        resume = dict(resume_from=resume_from_checkpoint, overwrite=overwrite)
        return _train(model, tokenizer, method, dataset, cfg, out, lr, data_description, callbacks, resume)


def _train(model, tokenizer, method, dataset, cfg, out: Path, lr, data_description, callbacks,
           resume_args: dict) -> TrainResult:
    out.mkdir(parents=True, exist_ok=True)
    lr = cfg.lr if lr is None else float(lr)
    if method == "none":
        return TrainResult(method, model, None, [], 0, 0.0, 0, lr, len(dataset))

    ckpt_dir = out / "checkpoints"
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, ckpt_dir, lr),
        train_dataset=dataset,
        data_collator=data_collator(tokenizer),
        callbacks=[*(callbacks or []), DivergenceGuard()],
    )
    identity = _run_identity(method, cfg, lr, dataset, data_description)
    budget = _budget_steps(trainer, cfg)
    resume = _from_main_process(lambda: _prepare_checkpoints(ckpt_dir, identity, cfg.resume, budget_steps=budget,
                                                             **resume_args))
    if resume:
        logger.info("%s: resuming from %s", method, resume)
    logger.info(
        "%s: training %d trainable parameters, lr=%g, %s steps of %d x %d sequences",
        method, sum(p.numel() for p in model.parameters() if p.requires_grad), lr,
        cfg.max_steps if cfg.max_steps > 0 else f"{cfg.epochs:g} epoch(s) of", cfg.batch_size, cfg.grad_accum,
    )
    start = time.perf_counter()
    steps, history = _run_trainer(trainer, model, resume, budget)
    seconds = time.perf_counter() - start
    model.eval()
    _check_finite(model, method, lr, steps)
    tokens = _tokens_seen(dataset, steps * cfg.batch_size * cfg.grad_accum)
    result = TrainResult(method, model, None, history, steps, seconds, tokens, lr, len(dataset), resume)
    if _launch_rank() == 0:
        result.adapter_dir = str(save_adapter(model, out / "adapter", method, cfg, lr, result, data_description))
        atomic_write_file(out / "train_log.json", json.dumps(history, indent=1) + "\n")
    return result


def _launch_rank() -> int:
    """This process's rank in a torchrun / accelerate launch (0 when not launched): known from the environment
    before the Trainer sets up the process group."""
    return int(os.environ.get("RANK", "0"))


def _from_main_process(decide):
    """``decide()`` run on rank 0 only (it may clear or mark checkpoints), its result sent to every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box = [decide() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _budget_steps(trainer: Trainer, cfg: TrainConfig) -> int:
    """The optimizer steps this run is to end at, counted as the Trainer counts them."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return int(trainer.set_initial_training_values(trainer.args, trainer.get_train_dataloader())[-1])


def _run_trainer(trainer: Trainer, model: nn.Module, resume: Optional[str], budget: int) -> tuple[int, list[dict]]:
    """Train (from ``resume`` if given) to ``budget`` steps; the steps done and the log history."""
    finished = _finished_state(resume, budget) if resume else None
    if finished is not None:
        # The checkpoint is the end of this very run: load it. (Trainer would run one step past max_steps.)
        _load_adapter_weights(model, resume)
        return int(finished["global_step"]), [dict(e) for e in finished.get("log_history", [])]
    trainer.train(resume_from_checkpoint=resume)
    return int(trainer.state.global_step), [dict(e) for e in trainer.state.log_history]


def _non_finite_param(model: nn.Module) -> Optional[str]:
    """The first trainable parameter holding NaN or inf, or ``None``."""
    for name, param in model.named_parameters():
        if param.requires_grad and not bool(torch.isfinite(param.detach()).all()):
            return name
    return None


class DivergenceGuard(TrainerCallback):
    """Stop at the first step that leaves a non-finite trainable weight: the run is lost, and the rest of
    the budget would be spent on NaNs (the Trainer's logged loss hides them: logging_nan_inf_filter)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None and _non_finite_param(model) is not None:
            control.should_training_stop = True
        return control


def _check_finite(model: nn.Module, method: str, lr: float, steps: int) -> None:
    """Refuse to save trained weights that hold NaN or inf (a diverged run): nothing useful can be merged."""
    name = _non_finite_param(model)
    if name is not None:
        from spp_peft.errors import TrainingDiverged

        raise TrainingDiverged(f"{method}: training produced non-finite adapter weights ({name}) by step {steps} "
                               f"with lr={lr:g}; nothing was saved: lower the learning rate")


def _tokens_seen(dataset: TokenDataset, sequences: int) -> int:
    if not len(dataset):
        return 0
    mean = dataset.num_tokens / len(dataset)
    return int(round(mean * sequences))
