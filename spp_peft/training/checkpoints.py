"""Checkpoints and resume: a run continues only its own checkpoints (same method, settings and data).

The settings a run was started with are recorded next to its checkpoints (:data:`IDENTITY_FILE`); a later
run with the same settings resumes from the newest complete checkpoint, any other run starts afresh.
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

#: Settings that do not change what a run computes; a checkpoint may be resumed across changes of these.
_VOLATILE = ("progress", "resume", "save_steps", "save_total_limit", "logging_steps")
IDENTITY_FILE = "spp_peft_run.json"


def _settings_identity(method: str, cfg: TrainConfig, lr: float, data: Optional[dict]) -> dict:
    settings = {k: v for k, v in asdict(cfg).items() if k not in _VOLATILE}
    return json.loads(json.dumps({"method": method, "lr": lr, "train": settings, "data": data}, default=str))


def _run_identity(method: str, cfg: TrainConfig, lr: float, dataset: TokenDataset, data: Optional[dict]) -> dict:
    return {**_settings_identity(method, cfg, lr, data), "examples": len(dataset), "tokens": dataset.num_tokens}


def is_resume(output_dir: Union[str, os.PathLike], method: str, cfg: TrainConfig, lr: Optional[float] = None,
              data: Optional[dict] = None) -> bool:
    """Whether :func:`~spp_peft.training.train` into ``output_dir`` would continue a run of the same settings
    (``cfg.resume`` and the folder's run record agrees), checked without loading anything: what lets a
    command rerun into its own non-empty output folder."""
    marker = Path(output_dir) / "checkpoints" / IDENTITY_FILE
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
    marker = ckpt_dir / IDENTITY_FILE
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
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    state = load_peft_weights(checkpoint, device="cpu")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"{checkpoint}: adapter weights do not fit the model: {unexpected[:3]}")
