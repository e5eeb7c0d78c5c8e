"""``SPPModel``: injects SPP layers into a (pruned) transformers model, PEFT-style.

Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models", ICML 2024,
arXiv:2405.16057.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ..sparsity import MaskRecord, SparsityViolation, describe_mask, is_linear_like, sparsity_report
from .config import SPP_TARGET_MODULES_MAPPING, SPPConfig
from .layer import Linear, SPPLayer

logger = logging.getLogger(__name__)


def _adapter_names_pre_forward_hook(target, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class SPPModel(BaseTuner):
    """Creates an SPP model from a pretrained (pruned) transformers model.

    Besides what every PEFT tuner does, ``SPPModel`` records, for each target module, the shape, sparsity,
    pattern and fingerprint of the base weight's zero mask (``SPPConfig.base_masks``, saved with the
    adapter), refuses to load an adapter onto a base with different masks, and checks after every merge
    and unmerge that no zero of the base was filled.

    Args:
        model: the model to adapt.
        config: the [`SPPConfig`].
        adapter_name: the adapter's name, ``"default"`` by default.

    Example:
        >>> import spp_peft  # registers SPP with PEFT
        >>> from peft import get_peft_model
        >>> model = get_peft_model(pruned_model, spp_peft.SPPConfig(r=16, spp_alpha=32))
        >>> merged = model.merge_and_unload()  # same zero pattern as pruned_model, guaranteed
    """

    prefix: str = "spp_"
    tuner_layer_cls = SPPLayer
    target_module_mapping = SPP_TARGET_MODULES_MAPPING

    def _prepare_adapter_config(self, peft_config: SPPConfig, model_config: dict) -> SPPConfig:
        if peft_config.target_modules is None:
            targets = self.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                logger.info("SPP: no default targets for model_type=%r, adapting all linear layers.",
                            model_config.get("model_type"))
                peft_config.target_modules = "all-linear"
            else:
                peft_config.target_modules = set(targets)
        return peft_config

    # ------------------------------------------------------------------------------ mask fingerprints

    @staticmethod
    def _base_weight(module: nn.Module) -> Optional[torch.Tensor]:
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        return base.weight if is_linear_like(base) else None

    def _pre_injection_hook(self, model: nn.Module, config: SPPConfig, adapter_name: str) -> None:
        """Before any module is touched: check the base's masks against the ones the adapter was trained on."""
        if not config.base_masks or not config.verify_base_masks:
            return
        mismatches = []
        modules = dict(model.named_modules())
        missing = [name for name in config.base_masks if name not in modules]
        if missing:
            mismatches.append(f"module '{missing[0]}' is missing from the base model")
        # Model order, so the error names the first mismatching module of the network.
        for name, module in modules.items():
            if mismatches:
                break
            if name not in config.base_masks:
                continue
            recorded = MaskRecord.from_dict(config.base_masks[name])
            module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            actual = describe_mask(module.weight, fan_in_fan_out=not isinstance(module, nn.Linear))
            if actual.fingerprint != recorded.fingerprint:
                mismatches.append(
                    f"module '{name}': the adapter was trained on a mask with sparsity {recorded.sparsity:.2%} "
                    f"({recorded.pattern}, shape {recorded.shape}, fingerprint {recorded.fingerprint[:12]}), the "
                    f"base has sparsity {actual.sparsity:.2%} ({actual.pattern}, shape {actual.shape}, "
                    f"fingerprint {actual.fingerprint[:12]})"
                )
        if mismatches:
            raise SparsityViolation(
                f"SPP adapter '{adapter_name}' does not match this base model's zero masks: {mismatches[0]}. "
                "Load it onto the pruned model it was trained on, or pass verify_base_masks=False (e.g. "
                "SPPConfig.from_pretrained(path, verify_base_masks=False)) to load it anyway."
            )

    def _create_and_replace(self, spp_config: SPPConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        kwargs = {
            "r": spp_config.r,
            "spp_alpha": spp_config.spp_alpha,
            "spp_dropout": spp_config.spp_dropout,
            "init_weights": spp_config.init_weights,
            "inference_mode": spp_config.inference_mode,
        }
        if isinstance(target, SPPLayer):
            target.update_layer(adapter_name, **kwargs)
            module = target
        else:
            module = self._create_new_module(spp_config, adapter_name, target, current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                module.requires_grad_(False)
            self._replace_module(parent, target_name, module, target)
        module.sparsity_check = spp_config.sparsity_check
        module.chunk_rows = spp_config.chunk_rows
        record = module.mask_record or module.record_mask()
        if current_key not in spp_config.base_masks:
            spp_config.base_masks[current_key] = record.to_dict()

    @staticmethod
    def _create_new_module(spp_config: SPPConfig, adapter_name, target, current_key, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not is_linear_like(base):
            raise TypeError(
                f"Target module '{current_key}' is {type(base).__name__}; SPP supports nn.Linear and "
                "transformers' Conv1D. Adjust target_modules / exclude_modules."
            )
        if isinstance(base, nn.Linear) and spp_config.fan_in_fan_out:
            warnings.warn(f"'{current_key}' is nn.Linear: fan_in_fan_out=True is ignored for it.")
        return Linear(target, adapter_name, module_name=current_key, **kwargs)

    def _post_injection_hook(self, model: nn.Module, config: SPPConfig, adapter_name: str) -> None:
        if config.base_pruning is None:
            pruning = getattr(getattr(model, "config", None), "spp_pruning", None)
            if pruning:
                config.base_pruning = dict(pruning)
        dense = [name for name, rec in config.base_masks.items() if rec["pattern"] == "dense"]
        if dense:
            warnings.warn(
                f"SPP adapter '{adapter_name}': {len(dense)} of {len(config.base_masks)} target module(s) have no "
                f"zero weight (first: '{dense[0]}'), so there is no sparsity to preserve there. Prune the model "
                "first (spp_peft.pruning.prune) or check target_modules."
            )

    # ------------------------------------------------------------------------- mixed adapter batches

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Pass ``adapter_names`` (one adapter name, or "__base__", per sample) down to every SPP layer."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        known = set()
        for module in self.modules():
            if isinstance(module, SPPLayer):
                known |= set(module.spp_A.keys())
        unknown = {n for n in adapter_names if n != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        handles = []
        for module in self.modules():
            if isinstance(module, SPPLayer):
                hook = partial(_adapter_names_pre_forward_hook, adapter_names=adapter_names)
                handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------------------------- SPP extras

    def spp_layers(self) -> dict[str, SPPLayer]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SPPLayer)}

    def verify_masks(self, adapter_name: Optional[str] = None) -> None:
        """Assert that every SPP layer's base weight still has the zero mask recorded at injection.

        Raises:
            SparsityViolation: naming the first module whose mask changed.
        """
        for name, layer in self.spp_layers().items():
            recorded = layer.mask_record
            actual = describe_mask(layer.get_base_layer().weight, layer.fan_in_fan_out)
            if recorded is not None and actual.fingerprint != recorded.fingerprint:
                raise SparsityViolation(
                    f"module '{name}': zero mask changed since injection (sparsity {recorded.sparsity:.2%} -> "
                    f"{actual.sparsity:.2%})"
                )

    def sparsity_report(self, **kwargs):
        """:func:`spp_peft.sparsity.sparsity_report` of the wrapped model."""
        return sparsity_report(self.model, **kwargs)
