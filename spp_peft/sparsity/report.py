"""Sparsity reports of whole models (per layer, totals, N:M compliance) and the assertion that two models or
state dicts have the same zero sets."""


from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn

from .masks import (
    SparsityViolation,
    ZeroSetChange,
    as_out_in,
    compare_zero_sets,
    detect_pattern,
    enforce_zero_set,
    is_fan_in_fan_out,
    is_linear_like,
    parse_nm,
    zero_mask,
)


def _strip_wrappers(name: str) -> str:
    """Names of PEFT-wrapped layers without the wrapper parts, so reports compare across stages."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".base_layer", "")


def linear_weights(model: Union[nn.Module, Mapping[str, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, bool]]:
    """``{module name: (weight, fan_in_fan_out)}`` for every linear-like layer of a model.

    A mapping of names to 2-D tensors (a state dict) is accepted too: its 2-D ``*.weight`` entries are
    taken as ``(out, in)`` weights under the name without ``.weight``.
    """
    found: dict[str, tuple[torch.Tensor, bool]] = {}
    if isinstance(model, nn.Module):
        for name, module in model.named_modules():
            if is_linear_like(module):
                found[_strip_wrappers(name)] = (module.weight, is_fan_in_fan_out(module))
        return found
    for name, tensor in model.items():
        if name.endswith(".weight") and tensor.dim() == 2:
            found[_strip_wrappers(name[: -len(".weight")])] = (tensor, False)
    return found


@dataclass
class LayerSparsity:
    name: str
    shape: list[int]
    zeros: int
    total: int
    pattern: str

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


@dataclass
class SparsityReport:
    """Per-layer and total sparsity of a model's linear layers (see :func:`sparsity_report`)."""

    layers: list[LayerSparsity] = field(default_factory=list)
    expected_pattern: Optional[str] = None

    @property
    def total_zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def total_sparsity(self) -> float:
        return self.total_zeros / self.total_params if self.total_params else 0.0

    def compliant(self, pattern: str) -> list[str]:
        """Names of layers that do NOT comply with ``pattern`` ("2:4" etc.); empty means all comply."""
        n, m = parse_nm(pattern)
        failing = []
        for layer in self.layers:
            if layer.pattern in ("dense", "unstructured"):
                failing.append(layer.name)
                continue
            ln, lm = parse_nm(layer.pattern)
            if not (lm == m and ln >= n) and not (m % lm == 0 and ln * (m // lm) >= n):
                failing.append(layer.name)
        return failing

    def to_dict(self) -> dict:
        return {
            "total_sparsity": self.total_sparsity,
            "total_zeros": self.total_zeros,
            "total_params": self.total_params,
            "expected_pattern": self.expected_pattern,
            "noncompliant_layers": self.compliant(self.expected_pattern) if self.expected_pattern else [],
            "layers": [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers],
        }

    def format(self, max_rows: Optional[int] = None) -> str:
        """A plain-text table, one row per layer plus the total."""
        rows = self.layers if max_rows is None else self.layers[:max_rows]
        width = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>13}  {'sparsity':>8}  pattern"]
        for r in rows:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(f"{r.name:<{width}}  {shape:>13}  {r.sparsity:>8.2%}  {r.pattern}")
        if max_rows is not None and len(self.layers) > max_rows:
            lines.append(f"... {len(self.layers) - max_rows} more layers")
        lines.append(f"{'total':<{width}}  {self.total_params:>13,}  {self.total_sparsity:>8.2%}")
        if self.expected_pattern:
            bad = self.compliant(self.expected_pattern)
            lines.append(
                f"{self.expected_pattern} compliance: "
                + ("all layers" if not bad else f"{len(bad)} layer(s) fail, first: {bad[0]}")
            )
        return "\n".join(lines)


def sparsity_report(
    model: Union[nn.Module, Mapping[str, torch.Tensor]],
    include: Optional[Iterable[str]] = None,
    exclude_dense: bool = False,
    expected_pattern: Optional[str] = None,
) -> SparsityReport:
    """Per-layer and total sparsity of the linear layers of ``model`` (an ``nn.Module`` or a state dict).

    Args:
        model: a model (PEFT-wrapped or not) or a ``{name: tensor}`` mapping.
        include: substrings; when given, only layers whose name contains one of them are reported
            (e.g. ``["q_proj", "v_proj"]``).
        exclude_dense: leave out layers without any zero (embeddings, ``lm_head``...).
        expected_pattern: an N:M pattern such as ``"2:4"`` to check every reported layer against.
    """
    include = list(include) if include is not None else None
    report = SparsityReport(expected_pattern=expected_pattern)
    for name, (weight, fan_in_fan_out) in linear_weights(model).items():
        if include is not None and not any(part in name for part in include):
            continue
        zeros = zero_mask(as_out_in(weight.detach(), fan_in_fan_out))
        count = int(zeros.sum().item())
        if exclude_dense and count == 0:
            continue
        report.layers.append(
            LayerSparsity(
                name=name,
                shape=list(zeros.shape),
                zeros=count,
                total=zeros.numel(),
                pattern=detect_pattern(zeros),
            )
        )
    return report


def assert_same_sparsity(
    before: Union[nn.Module, Mapping[str, torch.Tensor]],
    after: Union[nn.Module, Mapping[str, torch.Tensor]],
    allow_new_zeros: bool = False,
) -> dict[str, ZeroSetChange]:
    """Assert that every linear layer present in both models has the same zero set.

    Works on any two models or state dicts (PEFT wrappers are seen through). Layers are matched by name;
    a layer of ``before`` missing from ``after`` is an error. Returns the per-layer changes (all unchanged
    unless ``allow_new_zeros``).

    Raises:
        SparsityViolation: naming the first layer whose zeros were filled (or, unless ``allow_new_zeros``,
            whose non-zeros became zero).
    """
    weights_before = linear_weights(before)
    weights_after = linear_weights(after)
    missing = [name for name in weights_before if name not in weights_after]
    if missing:
        raise SparsityViolation(f"layer '{missing[0]}' of the first model is missing from the second")
    changes = {}
    for name, (weight, fan_in_fan_out) in weights_before.items():
        other, other_fan = weights_after[name]
        zeros = zero_mask(as_out_in(weight.detach(), fan_in_fan_out))
        change = compare_zero_sets(zeros, as_out_in(other.detach(), other_fan))
        message = enforce_zero_set(name, change, "warn" if allow_new_zeros else "strict", "the change")
        if message:
            warnings.warn(message)
        changes[name] = change
    return changes
