"""Checkpoints and resume, as transformers' ``Trainer`` users expect: a run continues its own checkpoints, and
never deletes them unless told to (``overwrite=True``).

The settings a run was started with are recorded next to its checkpoints (:data:`IDENTITY_FILE`). A later
run resumes from the newest complete checkpoint when its settings are the same up to the budget
(:data:`BUDGET`): a grown budget continues the run (Trainer's ``resume_from_checkpoint``), keeping every
checkpoint. Checkpoints of other settings (method, learning rate, adapter, data, ...) are refused with
:class:`~spp_peft.errors.CheckpointMismatch`, and removed only with ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

from torch import nn

from spp_peft._utils import atomic_write_file

from .config import TrainConfig
from .dataset import TokenDataset

logger = logging.getLogger(__name__)

#: The budget: a run whose budget grew continues from its last checkpoint. Trainer rebuilds the learning-rate
#: schedule for the new total, so the continued run equals one started with that budget only for a schedule
#: that does not depend on the total (``constant``); a linear or cosine one decays over the new total from
#: where the run stands, as with Trainer's own resume.
BUDGET = ("max_steps", "epochs")
#: Settings a run's checkpoints stay valid across: those that change nothing computed, and the budget.
_VOLATILE = ("progress", "resume", "save_steps", "save_total_limit", "logging_steps", *BUDGET)
IDENTITY_FILE = "spp_peft_run.json"
#: ``resume_from_checkpoint`` as Trainer takes it: None (``cfg.resume`` decides), True (the output folder's
#: last checkpoint) or the path of a checkpoint folder.
ResumeFrom = Union[None, bool, str, os.PathLike]


def _settings_identity(method: str, cfg: TrainConfig, lr: float, data: Optional[dict]) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _VOLATILE}
    return json.loads(json.dumps({"method": method, "lr": lr, "train": settings, "data": data}, default=str))


def _run_identity(method: str, cfg: TrainConfig, lr: float, dataset: TokenDataset, data: Optional[dict]) -> dict:
    budget = {k: getattr(cfg, k) for k in BUDGET}
    return {**_settings_identity(method, cfg, lr, data), "examples": len(dataset), "tokens": dataset.num_tokens,
            "budget": budget}


def _comparable(record: dict, with_data_size: bool = True) -> dict:
    """``record`` without what a resume may change (records of older versions held the budget in ``train``)."""
    dropped = ("budget",) if with_data_size else ("budget", "examples", "tokens")
    # An empty TrainingArguments pass-through ("args": {}) is the same run as a record from before it existed.
    train = {k: v for k, v in (record.get("train") or {}).items()
             if k not in _VOLATILE and not (k == "args" and not v)}
    return {**{k: v for k, v in record.items() if k not in dropped}, "train": train}


def _read_record(ckpt_dir: Path) -> Optional[dict]:
    try:
        record = json.loads((ckpt_dir / IDENTITY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    """``key: old -> new`` for the settings that differ (``train.`` keys flattened), for a message."""
    from spp_peft.errors import quote

    def flat(record: dict) -> dict:
        return {**{k: v for k, v in record.items() if k != "train"},
                **{f"train.{k}": v for k, v in (record.get("train") or {}).items()}}

    a, b = flat(old), flat(new)
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {quote(a.get(k))} -> {quote(b.get(k))}" for k in keys[:limit]) or "unrecorded"


def is_resume(output_dir: Union[str, os.PathLike], method: str, cfg: TrainConfig, lr: Optional[float] = None,
              data: Optional[dict] = None, resume_from_checkpoint: ResumeFrom = None) -> bool:
    """Whether :func:`~spp_peft.training.train` into ``output_dir`` would continue a run of the same settings
    up to the budget (resuming is on: ``resume_from_checkpoint``, else ``cfg.resume``; and the folder's run
    record agrees), checked without loading anything: what lets a command rerun into its own non-empty
    output folder."""
    previous = _read_record(Path(output_dir) / "checkpoints")
    wanted = cfg.resume if resume_from_checkpoint is None else bool(resume_from_checkpoint)
    if not wanted or previous is None:
        return False
    settings = _settings_identity(method, cfg, cfg.lr if lr is None else float(lr), data)
    return _comparable(previous, with_data_size=False) == _comparable(settings)


def _prepare_checkpoints(ckpt_dir: Path, identity: dict, resume: bool, overwrite: bool = False,
                         resume_from: ResumeFrom = None, budget_steps: Optional[int] = None) -> Optional[str]:
    """The checkpoint to resume from (None: start afresh), once it is known this run may use ``ckpt_dir``;
    then records ``identity`` there.

    ``resume_from`` is Trainer's ``resume_from_checkpoint`` (None: ``resume`` decides). Checkpoints in
    ``ckpt_dir`` that this run would not continue (other settings, or resuming is off) are removed only with
    ``overwrite``; otherwise :class:`~spp_peft.errors.CheckpointMismatch`. A checkpoint past
    ``budget_steps`` is refused (its run went further than this one may).
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_record(ckpt_dir)
    newest = _last_complete_checkpoint(ckpt_dir)
    wanted = resume if resume_from is None else resume_from
    explicit = isinstance(wanted, (str, os.PathLike))
    # Checked first: a checkpoint of ckpt_dir itself must not be cleared away before it is refused or used.
    checkpoint = _checked_checkpoint(Path(wanted), identity) if explicit else None
    compatible = previous is not None and _comparable(previous) == _comparable(identity)
    if newest and not (wanted and compatible):
        _clear_checkpoints(ckpt_dir, previous, identity, compatible, overwrite)
        newest = None
    if resume_from is True and newest is None:
        raise ValueError(f"resume_from_checkpoint=True: {ckpt_dir} holds no checkpoint to resume from")
    if not explicit:
        checkpoint = newest if wanted else None
    if checkpoint and budget_steps is not None:
        _check_budget(checkpoint, budget_steps)
    if checkpoint and previous and previous.get("budget") not in (None, identity.get("budget")):
        logger.info("budget changed from %s to %s: continuing %s", previous["budget"], identity["budget"], checkpoint)
    atomic_write_file(ckpt_dir / IDENTITY_FILE, json.dumps(identity, indent=1) + "\n")
    return checkpoint


def _clear_checkpoints(ckpt_dir: Path, previous: Optional[dict], identity: dict, compatible: bool,
                       overwrite: bool) -> None:
    """Remove the checkpoints of ``ckpt_dir`` that this run will not continue, only if ``overwrite``."""
    from spp_peft.errors import CheckpointMismatch

    why = ("resuming is off (train.resume=false)" if compatible
           else f"a run with other settings ({_differences(_comparable(previous or {}), _comparable(identity))})")
    if not overwrite:
        raise CheckpointMismatch(f"{ckpt_dir} holds checkpoints of {why}; nothing was deleted: pass "
                                 "overwrite=True (--overwrite) to delete them and start afresh, or choose "
                                 "another output folder")
    logger.warning("%s holds checkpoints of %s: overwrite, deleting them and starting afresh", ckpt_dir, why)
    for old in ckpt_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)


def _checked_checkpoint(path: Path, identity: dict) -> str:
    """``path`` (``resume_from_checkpoint=PATH``) once it is known to be a complete checkpoint of compatible
    settings (its folder's run record, when it has one, agrees)."""
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    if _checkpoint_state(str(path)) is None:
        raise ValueError(f"resume_from_checkpoint: {path} is not a complete Trainer checkpoint "
                         "(no readable trainer_state.json)")
    record = _read_record(path.parent)
    if record is None:
        logger.warning("%s: no run record beside it; its settings cannot be checked against this run's", path)
    elif _comparable(record) != _comparable(identity):
        raise ValueError(f"resume_from_checkpoint: {path} is a checkpoint of a run with other settings "
                         f"({_differences(_comparable(record), _comparable(identity))}); resume it with "
                         "its own settings")
    return str(path)


def _check_budget(checkpoint: str, budget_steps: int) -> None:
    step = int((_checkpoint_state(checkpoint) or {}).get("global_step", 0))
    if step > budget_steps:
        raise ValueError(f"{checkpoint} is at step {step}, past this run's budget of {budget_steps} steps: raise "
                         "max_steps / epochs, resume an earlier checkpoint (resume_from_checkpoint=PATH), or "
                         "start afresh (resume off and overwrite=True)")


def last_checkpoint(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The newest ``checkpoint-N`` folder under ``folder``, or ``None``."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if os.path.isdir(folder) else None


def _last_complete_checkpoint(ckpt_dir: Path) -> Optional[str]:
    """The newest checkpoint that the Trainer finished writing. The Trainer writes ``checkpoint-N`` in place
    and ``trainer_state.json`` last; a folder without a readable one is what a crash (kill -9, full disk)
    left mid-save: it is removed, and the checkpoint before it is used."""
    while True:
        checkpoint = last_checkpoint(ckpt_dir)
        if checkpoint is None:
            return None
        if _checkpoint_state(checkpoint) is not None:
            return checkpoint
        logger.warning("%s is incomplete (interrupted while saving): removed", checkpoint)
        shutil.rmtree(checkpoint, ignore_errors=True)


def _checkpoint_state(checkpoint: str) -> Optional[dict]:
    """The Trainer state a checkpoint holds, or ``None`` when it has no readable one."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _finished_state(checkpoint: str, budget_steps: Optional[int] = None) -> Optional[dict]:
    """The Trainer state of ``checkpoint`` if it reached the budget (``budget_steps``, else the ``max_steps``
    of the run that wrote it), else ``None``."""
    state = _checkpoint_state(checkpoint)
    if state is None:
        return None
    target = budget_steps if budget_steps is not None else state.get("max_steps")
    return state if target and int(state.get("global_step", 0)) >= int(target) else None


def _load_adapter_weights(model: nn.Module, checkpoint: str) -> None:
    """Load the adapter weights a Trainer checkpoint holds into ``model`` (a ``PeftModel``), exactly."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    state = load_peft_weights(checkpoint, device="cpu")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model: {unexpected[:3]}")
