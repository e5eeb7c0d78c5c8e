"""``SPPModel``: injects SPP layers into a (pruned) transformers model, PEFT-style.

Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models", ICML 2024,
arXiv:2405.16057.
"""

from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from functools import partial
from typing import Optional

from torch import nn

from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import _get_submodules

from ..sparsity import sparsity_report
from .checks import (
    PEFT_PREFIX,
    AdapterFileError,
    Target,
    base_of,
    check_adapter_tensors,
    check_base_masks,
    resolve_targets,
    validate_targets,
)
from .config import SPP_TARGET_MODULES_MAPPING, SPPConfig
from .bnb import QuantizedLinear, quantized_kind
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

    @classmethod
    def _prepare_adapter_config(cls, peft_config: SPPConfig, model_config) -> SPPConfig:
        """Default targets per architecture (a classmethod: an adapter file is checked before a tuner exists)."""
        if model_config is not None and not isinstance(model_config, dict):
            model_config = model_config.to_dict()
        model_config = model_config or {}
        if peft_config.target_modules is None:
            targets = cls.target_module_mapping.get(model_config.get("model_type"))
            if targets is None:
                logger.info("SPP: no default targets for model_type=%r, adapting all linear layers.",
                            model_config.get("model_type"))
                peft_config.target_modules = "all-linear"
            else:
                peft_config.target_modules = set(targets)
        return peft_config

    # ------------------------------------------------------------------------------------- injection

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """PEFT's injection, made all-or-nothing: targets and recorded masks are checked before any module is
        replaced, and a failure during injection restores every replaced module.

        The adapter works on a copy of its config, so the config the caller passed keeps its meaning and can
        serve another model (mask records are written into the copy)."""
        config = copy.deepcopy(self.peft_config[adapter_name])
        self.peft_config[adapter_name] = config
        config = self._prepare_adapter_config(config, self.get_model_config(model))
        targets = resolve_targets(model, config)
        validate_targets(targets, config)
        if config.from_saved_adapter:
            check_base_masks(config, targets, adapter_name)
        if config.base_masks is None or not config.verify_base_masks:
            config.base_masks = {}  # recorded afresh from this base in _create_and_replace
        requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
        except BaseException:
            remove_adapter(model, self.peft_config, adapter_name, requires_grad)
            raise
        self._requires_grad_before = getattr(self, "_requires_grad_before", {})
        self._requires_grad_before[adapter_name] = requires_grad

    def _create_and_replace(self, spp_config: SPPConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        kwargs = {
            "r": spp_config.r_for(current_key),
            "spp_alpha": spp_config.alpha_for(current_key),
            "spp_dropout": spp_config.spp_dropout,
            "init_weights": spp_config.init_weights,
            "inference_mode": spp_config.inference_mode,
            "sparsity_check": spp_config.sparsity_check or ("warn" if quantized_kind(base_of(target)) else "strict"),
        }
        if isinstance(target, SPPLayer):
            target.update_layer(adapter_name, **kwargs)
            module = target
        else:
            module = self._create_new_module(spp_config, adapter_name, target, current_key, **kwargs)
            if adapter_name not in self.active_adapters:
                module.requires_grad_(False)
            self._replace_module(parent, target_name, module, target)
        module.chunk_rows = spp_config.chunk_rows
        record = module.mask_record or module.record_mask()
        if current_key not in spp_config.base_masks:
            spp_config.base_masks[current_key] = record.to_dict()

    @staticmethod
    def _create_new_module(spp_config: SPPConfig, adapter_name, target, current_key, **kwargs):
        base = base_of(target)
        if quantized_kind(base):  # bitsandbytes Linear4bit / Linear8bitLt (QLoRA-style)
            return QuantizedLinear(target, adapter_name, module_name=current_key, **kwargs)
        if isinstance(base, nn.Linear) and spp_config.fan_in_fan_out:
            warnings.warn(f"'{current_key}' is nn.Linear: fan_in_fan_out=True is ignored for it.")
        return Linear(target, adapter_name, module_name=current_key, **kwargs)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Every PEFT load path passes the adapter file's tensors through here before they reach the model:
        anything but this adapter's factors, a missing, misshapen or non-finite tensor, is refused, and the
        adapter just injected for it is removed again (the base model is left as it was)."""
        targets = {
            name.removeprefix(PEFT_PREFIX): Target(m.in_features, m.out_features, m.r[adapter_name])
            for name, m in model.named_modules()
            if isinstance(m, SPPLayer) and adapter_name in m.spp_A
        }
        shapes = {k.removeprefix(PEFT_PREFIX): tuple(v.shape) for k, v in model.state_dict().items()}
        try:
            check_adapter_tensors(state_dict, targets, config, adapter_name, shapes)
        except AdapterFileError:
            tuner = getattr(model, "base_model", None)
            before = getattr(tuner, "_requires_grad_before", {}).get(adapter_name, [])
            remove_adapter(getattr(tuner, "model", model), model.peft_config, adapter_name, before)
            raise
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

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
        """Assert that every unmerged SPP layer's base weight still has the zero mask recorded at injection.

        Raises:
            SparsityViolation: naming the first module whose mask changed.
        """
        for layer in self.spp_layers().values():
            layer.verify_base_mask()

    # ----------------------------------------------------------------------- all-or-nothing merging

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """PEFT's ``merge_adapter``, all-or-nothing: every layer's merge is checked before any is written."""
        self._check_merge_allowed()
        with self._checked_merge(safe_merge, adapter_names):
            super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        """PEFT's ``unmerge_adapter``, all-or-nothing."""
        for layer in self.spp_layers().values():
            layer.check_unmerge()
        super().unmerge_adapter()

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names: Optional[list[str]] = None):
        # merge_and_unload replaces each layer right after merging it, so a refusal in layer 14 would leave 13
        # merged and unloaded; checking every layer first makes a refusal leave the model exactly as it was.
        if not merge:
            return super()._unload_and_optionally_merge(merge=False, progressbar=progressbar)
        self._check_merge_allowed()
        with self._checked_merge(safe_merge, adapter_names):
            report = self.merge_report()
            model = super()._unload_and_optionally_merge(merge=True, progressbar=progressbar, safe_merge=safe_merge,
                                                         adapter_names=adapter_names)
        if report:
            model.spp_merge_report = report
        return model

    @contextmanager
    def _checked_merge(self, safe_merge: bool, adapter_names: Optional[list[str]]):
        """Check every layer's merge (raising before anything is written), then let the layers merge without
        checking the same, deterministic result a second time."""
        layers = list(self.spp_layers().values())
        for layer in layers:
            layer.check_merge(safe_merge=safe_merge, adapter_names=adapter_names, emit=True)
        for layer in layers:
            layer._merge_prechecked = True
        try:
            yield
        finally:
            for layer in layers:
                layer._merge_prechecked = False

    def merge_report(self) -> dict[str, int]:
        """``{module: weights that became exact zeros}`` for the last merge checked, where any did (quantized
        bases round small weights to 0 when requantizing; full-precision merges add none unless a factor is 0)."""
        return {
            name: change.new_zeros
            for name, layer in self.spp_layers().items()
            if (change := getattr(layer, "last_zero_set_change", None)) is not None and change.new_zeros
        }

    def sparsity_report(self, **kwargs):
        """:func:`spp_peft.sparsity.sparsity_report` of the wrapped model."""
        return sparsity_report(self.model, **kwargs)


def remove_adapter(model: nn.Module, peft_config: dict, adapter_name: str, requires_grad=()) -> None:
    """Undo the injection of ``adapter_name``: layers that only held it become their base layer again, others
    drop it; its config entry goes, and parameters get back the ``requires_grad`` they had before."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, SPPLayer) or adapter_name not in module.spp_A:
            continue
        if set(module.spp_A) == {adapter_name}:
            parent, _, child = _get_submodules(model, name)
            setattr(parent, child, module.get_base_layer())
        else:
            module.delete_adapter(adapter_name)
    peft_config.pop(adapter_name, None)
    if not peft_config and getattr(model, "peft_config", None) is peft_config:
        del model.peft_config
    for param, flag in requires_grad:
        param.requires_grad_(flag)
