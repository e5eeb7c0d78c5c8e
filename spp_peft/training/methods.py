"""The adapter of each method: built on a pruned model, saved, loaded back and merged.

``spp`` is SPP (Lu et al., ICML 2024, arXiv:2405.16057), ``W' = W * (1 + s * B A)``: the pruned zeros stay
zero by construction through training, merging and export. ``lora_star`` and ``masked_lora`` are the LoRA
baselines of :mod:`spp_peft.training.baselines`; ``none`` is the pruned model as it is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import nn

from spp_peft._utils import atomic_write_dir

from .baselines import attach_masked_lora, merge_lora_star
from .config import TrainConfig, check_method

if TYPE_CHECKING:
    from .trainer import TrainResult

#: Written next to every saved adapter: which method trained it (decides how it is loaded and merged).
METHOD_FILE = "spp_peft_training.json"


def peft_config(method: str, cfg: TrainConfig):
    """The PEFT config of a trained method (:class:`spp_peft.SPPConfig` or ``peft.LoraConfig``)."""
    check_method(method)
    if method == "none":
        raise ValueError("method 'none' trains nothing and has no adapter config")
    if method == "spp":
        from spp_peft.tuner import SPPConfig

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
    # Importing peft registers SPP with it and installs the model-card hook (spp_peft/__init__.py).
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # A bitsandbytes base (QLoRA-style): PEFT's preparation (fp32 norms and head, input grads) works for
        # SPP too; activation recomputation only when the config asks for it, as for full precision.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    torch.manual_seed(cfg.seed)
    peft_model = get_peft_model(model, peft_config(method, cfg))
    if method == "masked_lora":
        attach_masked_lora(peft_model)
    return peft_model


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
    from spp_peft.hub import write_training_card

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
        write_training_card(tmp / "README.md", info, folder.name)
    return folder


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
        from spp_peft.hub import load_adapter

        return load_adapter(base_model, str(adapter_dir), is_trainable=is_trainable), method
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=is_trainable)
    if method == "masked_lora":
        attach_masked_lora(model)
    return model, method


def merge(model: nn.Module, method: str) -> nn.Module:
    """The plain merged model of a trained method (the adapter folded into the weights).

    ``spp``: PEFT's ``merge_and_unload`` (the tuner checks the zero sets); ``masked_lora``: the masked
    update is merged, which keeps the zeros; ``lora_star``: LoRA is merged, then re-masked with the base's
    zero mask (:func:`~spp_peft.training.baselines.merge_lora_star`); ``none``: the model unchanged.
    """
    check_method(method)
    if method == "none":
        return model
    merged = merge_lora_star(model) if method == "lora_star" else model.merge_and_unload()
    merged.eval()
    return merged
