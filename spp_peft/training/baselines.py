"""The baselines SPP is compared with, both built on PEFT's LoRA.

``lora_star``
    The paper's LoRA* baseline: plain LoRA (Hu et al., 2021) is trained, merged (which fills the pruned
    zeros), then the merged weight is *re-masked* with the base's zero mask (:func:`merge_lora_star`).
``masked_lora``
    LoRA whose update is masked during training and merging, ``W + s * (B A) * M`` with ``M`` the base's
    non-zero mask: SQFT's SparsePEFT (Munoz et al., 2024, arXiv:2410.03750). A PEFT LoRA *variant*
    (:class:`MaskedLoraVariant`), so PEFT's forward, merge, unmerge and save all go through it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from spp_peft.sparsity import as_out_in, zero_mask

logger = logging.getLogger(__name__)

#: The buffer in which :class:`MaskedLoraVariant` keeps the base's non-zero mask on each LoRA layer.
MASK_BUFFER = "masked_lora_keep"


class MaskedLoraVariant(LoraVariant):
    """LoRA with the update masked by the base's non-zero mask: ``W + s * (B A) * M`` (SQFT's SparsePEFT).

    ``M`` (``module.masked_lora_keep``, bool, the base weight's layout) is captured from the frozen base
    when the variant is attached; forward, merge and unmerge all use the same masked delta, so a merge
    keeps every zero of the base (``0 + 0 = 0`` exactly).
    """

    def supports_lora_conversion(self) -> bool:
        return False

    @staticmethod
    def init(module, adapter_name: str, **kwargs) -> None:  # the mask is attached after injection
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


def attach_masked_lora(peft_model: nn.Module) -> int:
    """Turn the LoRA layers of ``peft_model`` into masked LoRA (see :class:`MaskedLoraVariant`).

    The base weights must be the pruned ones (frozen, unmerged). Returns the number of layers changed.
    """
    count = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLinear):
            continue
        if module.merged:
            raise RuntimeError("attach_masked_lora: the LoRA layers are merged; attach before merging")
        keep = ~zero_mask(module.get_base_layer().weight.detach())
        module.register_buffer(MASK_BUFFER, keep, persistent=False)
        for adapter in module.lora_A:
            module.lora_variant[adapter] = MaskedLoraVariant()
        count += 1
    if count == 0:
        raise ValueError("attach_masked_lora: the model has no LoRA linear layer")
    return count


@torch.no_grad()
def remask(model: nn.Module, masks: dict[str, torch.Tensor]) -> int:
    """Zero ``model``'s linear weights where ``masks`` (``{module name: zero mask}``) is True; the count reset."""
    reset = 0
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        reset += int((weight[mask] != 0).sum().item())
        weight.masked_fill_(mask.to(weight.device), 0)
    return reset


def merge_lora_star(peft_model: nn.Module) -> nn.Module:
    """LoRA*: merge plain LoRA, then re-mask each merged weight with its base's zero mask (captured from the
    frozen base just before merging)."""
    prefix = "base_model.model."
    masks = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            key = name[len(prefix):] if name.startswith(prefix) else name
            masks[key] = zero_mask(module.get_base_layer().weight.detach())
    merged = peft_model.merge_and_unload()
    reset = remask(merged, masks)
    logger.info("lora_star: re-masking reset %d merged weights to zero", reset)
    return merged
