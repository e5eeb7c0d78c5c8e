"""The tuner's gatekeepers: what must hold before an adapter touches a model.

Three doors, each checked before anything is written, so that a refusal leaves the model as it was:

* the targets (:func:`resolve_targets`, :func:`validate_targets`): every module the adapter will wrap is found
  with PEFT's own matching and checked (type, ``1 <= r <= out_features``) before the first one is replaced;
* the recorded masks (:func:`check_base_masks`): a saved adapter must name the zero mask of every module it
  targets, and the base must have exactly that mask. Whether to check is the loading person's choice (the
  ``verify_base_masks`` argument of the loaders), never the file's;
* the adapter's tensors (:func:`check_adapter_tensors`): an adapter file may hold SPP factors (and declared
  ``modules_to_save`` / learnable biases) and nothing else, each of the right shape, a float dtype and finite.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists

from ..sparsity import (
    MaskRecord,
    SparsityViolation,
    describe_mask,
    in_out_features,
    is_fan_in_fan_out,
    is_linear_like,
)

PEFT_PREFIX = "base_model.model."
FACTORS = ("spp_A", "spp_B")
OVERRIDE_HINT = (
    "Load it onto the pruned model it was trained on; if you are sure this base is right, load with "
    "spp_peft.load_adapter(model, path, verify_base_masks=False)."
)


class AdapterFileError(ValueError):
    """An adapter file (or state dict) that must not be loaded: a foreign, missing or malformed tensor."""


@dataclass(frozen=True)
class Target:
    """What the checks need to know of one adapted module: its size and the adapter's ``r`` there."""

    in_features: int
    out_features: int
    r: int


def base_of(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def resolve_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """``{name: module}`` of the modules ``config`` targets in ``model``, in model order, with PEFT's matching.

    Inside an existing tuner layer only the layer itself counts (its ``base_layer`` is internal), as in
    ``BaseTuner.inject_adapter``.
    """
    config = _maybe_include_all_linear_layers(config, model)
    tuner_prefixes = tuple(name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer))
    return {
        name: module
        for name, module in model.named_modules()
        if name and not name.startswith(tuner_prefixes) and check_target_module_exists(config, name)
    }


def validate_targets(targets: Mapping[str, nn.Module], config) -> dict[str, Target]:
    """Check every target before any is replaced: a linear-like layer with ``1 <= r <= out_features`` (``r``
    of that module: ``config.r_for(name)``)."""
    checked = {}
    for name, module in targets.items():
        r = config.r_for(name)
        base = base_of(module)
        if not is_linear_like(base):
            raise ValueError(
                f"Target module '{name}' is {type(base).__name__}; SPP supports nn.Linear and transformers' "
                "Conv1D. Adjust target_modules / exclude_modules."
            )
        in_features, out_features = in_out_features(base)
        if not 1 <= r <= out_features:
            raise ValueError(
                f"SPP r={r} is invalid for module '{name}' with out_features={out_features}: r is the number of "
                "row groups and must satisfy 1 <= r <= out_features. Lower r, give this module its own with "
                "rank_pattern, or exclude it."
            )
        checked[name] = Target(in_features, out_features, r)
    return checked


# ------------------------------------------------------------------------------------------ mask records


def _record(name: str, raw) -> MaskRecord:
    try:
        return MaskRecord.from_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(f"the adapter's mask record of module '{name}' is malformed ({err})") from None


def check_base_masks(config, targets: Mapping[str, nn.Module], adapter_name: str) -> None:
    """For a saved adapter: every target has a recorded mask and the base has exactly that mask.

    An adapter with no record at all (saved before fingerprints existed) loads with a loud warning; an empty or
    partial record is an error, since the file alone must never decide what is checked.
    """
    records = config.base_masks
    if records is None:
        warnings.warn(
            f"SPP adapter '{adapter_name}' has no record of the zero masks of the base it was trained on (saved by "
            "an older spp-peft, or edited): it cannot be verified against this base. Merging still keeps every zero "
            "of this base; re-save the adapter to record its masks."
        )
        return
    if not config.verify_base_masks:
        return
    extra = sorted(set(records) - set(targets))
    if extra:
        raise SparsityViolation(
            f"SPP adapter '{adapter_name}' records module '{extra[0]}', which this model does not have or does not "
            f"target. {OVERRIDE_HINT}"
        )
    for name, module in targets.items():
        if name not in records:
            raise SparsityViolation(
                f"SPP adapter '{adapter_name}': target module '{name}' has no recorded mask in the adapter, so the "
                f"base cannot be verified. {OVERRIDE_HINT}"
            )
        recorded = _record(name, records[name])
        base = base_of(module)
        actual = describe_mask(base.weight, fan_in_fan_out=is_fan_in_fan_out(base))
        if actual.fingerprint != recorded.fingerprint:
            raise SparsityViolation(
                f"SPP adapter '{adapter_name}' does not match this base model's zero masks: module '{name}': the "
                f"adapter was trained on a mask with sparsity {recorded.sparsity:.2%} ({recorded.pattern}, shape "
                f"{recorded.shape}, fingerprint {recorded.fingerprint[:12]}), the base has sparsity "
                f"{actual.sparsity:.2%} ({actual.pattern}, shape {actual.shape}, fingerprint "
                f"{actual.fingerprint[:12]}). {OVERRIDE_HINT}"
            )


# --------------------------------------------------------------------------------------- adapter tensors


def _expected_shapes(targets: Mapping[str, Target]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name, t in targets.items():
        shapes[f"{name}.spp_A"] = (t.r, t.in_features)
        shapes[f"{name}.spp_B"] = (t.out_features,)
    return shapes


def _allowed_extra(key: str, config, adapter_name: str, targets: Mapping[str, Target]) -> bool:
    """Non-factor entries PEFT itself saves: declared ``modules_to_save`` and learnable biases."""
    module = key.rpartition(".")[0]
    if f".modules_to_save.{adapter_name}." in f".{key}":
        return True
    if config.modules_to_save and module not in targets and any(
        module == m or module.endswith("." + m) for m in config.modules_to_save
    ):
        return True
    if key.endswith(".bias") and config.bias != "none":
        owner = module.removesuffix(".base_layer")
        return config.bias == "all" or owner in targets
    return False


def _check_tensor(key: str, value, shape) -> None:
    if not isinstance(value, torch.Tensor):
        raise AdapterFileError(f"adapter tensor '{key}' is a {type(value).__name__}, not a tensor")
    if not value.dtype.is_floating_point:
        raise AdapterFileError(f"adapter tensor '{key}' has dtype {value.dtype}; a floating-point dtype is required")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise AdapterFileError(f"adapter tensor '{key}' has shape {tuple(value.shape)}; this model needs {tuple(shape)}")
    if value.device.type != "meta" and not bool(torch.isfinite(value).all()):
        raise AdapterFileError(f"adapter tensor '{key}' holds non-finite values (NaN or inf)")


def check_adapter_tensors(
    state_dict: Mapping[str, torch.Tensor],
    targets: Mapping[str, Target],
    config,
    adapter_name: str,
    model_shapes: Mapping[str, tuple[int, ...]] = {},
) -> None:
    """Refuse a checkpoint (keys without the adapter name) holding anything but this adapter's tensors.

    ``targets`` are named as in the unwrapped model; checkpoint keys may carry PEFT's ``base_model.model.``
    prefix. ``model_shapes`` gives the shapes of other entries (biases, modules_to_save) where known.
    """
    expected = _expected_shapes(targets)
    seen = set()
    for key, value in state_dict.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name in expected:
            _check_tensor(key, value, expected[name])
            seen.add(name)
        elif _allowed_extra(name, config, adapter_name, targets):
            _check_tensor(key, value, model_shapes.get(name))
        else:
            raise AdapterFileError(
                f"adapter file holds '{key}', which is not a tensor of SPP adapter '{adapter_name}': only spp_A / "
                "spp_B factors (and declared modules_to_save) may be loaded; refusing to write it into the model"
            )
    missing = sorted(set(expected) - seen, key=list(expected).index)
    if missing:
        raise AdapterFileError(
            f"adapter file lacks '{PEFT_PREFIX}{missing[0]}' ({len(missing)} tensor(s) of SPP adapter "
            f"'{adapter_name}' missing); an incomplete adapter is never loaded"
        )

