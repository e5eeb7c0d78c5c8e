"""Zero masks of weights: orientation of linear layers, N:M patterns, fingerprints, and the comparison of two
zero sets (with the integrity policy applied after a merge or unmerge). Imports nothing of spp-peft's own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

import torch
from torch import nn

# The N:M block sizes tried when detecting a pattern (largest ratio wins, ties go to the smaller M).
NM_BLOCK_SIZES = (4, 8, 16, 32)


class SparsityViolation(RuntimeError):
    """Raised when the zero set of a weight changed where it must not have."""


def conv1d_class():
    """transformers' GPT-2 style ``Conv1D`` (weight stored as ``(in, out)``), or ``None`` if unavailable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # pragma: no cover - transformers is a hard dependency; this guards odd installs
        return None
    return Conv1D


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """True when ``module.weight`` is stored as ``(in, out)``: transformers' GPT-2 style ``Conv1D``."""
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D``: the layers we prune and adapt."""
    return isinstance(module, nn.Linear) or is_fan_in_fan_out(module)


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like layer (``Conv1D`` stores its weight as ``(in, out)``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_linear_like(module):
        in_features, out_features = module.weight.shape
        return int(in_features), int(out_features)
    raise ValueError(f"{type(module).__name__} is not a linear layer (nn.Linear or transformers' Conv1D)")


def as_out_in(weight: torch.Tensor, fan_in_fan_out: bool = False) -> torch.Tensor:
    """View ``weight`` as ``(out_features, in_features)``."""
    return weight.T if fan_in_fan_out else weight


def zero_mask(weight: torch.Tensor) -> torch.Tensor:
    """The zero set of ``weight``: a bool tensor that is True exactly where the weight is 0."""
    return weight == 0


def mask_fingerprint(mask: torch.Tensor) -> str:
    """A compact, deterministic fingerprint of a bool mask (shape + sha256 of the packed bits).

    Two masks have the same fingerprint exactly when they have the same shape and the same True entries
    (up to sha256 collisions). Used to check that an adapter is loaded onto the base it was trained on.
    """
    flat = mask.detach().reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    packed = (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    digest = hashlib.sha256()
    digest.update(json.dumps(list(mask.shape)).encode())
    digest.update(packed.numpy().tobytes())
    return digest.hexdigest()[:32]


def zeros_per_group(zero_out_in: torch.Tensor, m: int) -> torch.Tensor:
    """Number of zeros in each block of ``m`` consecutive input weights of each row: ``(out, in // m)``."""
    rows, cols = zero_out_in.shape
    if cols % m:
        raise ValueError(f"in_features={cols} is not divisible by the N:M block size M={m}")
    return zero_out_in.reshape(rows, cols // m, m).sum(dim=-1)


def nm_compliance(zero_out_in: torch.Tensor, n: int, m: int) -> float:
    """Fraction of the M-blocks of a ``(out, in)`` zero mask that hold at least ``n`` zeros (1.0 = compliant)."""
    counts = zeros_per_group(zero_out_in, m)
    return float((counts >= n).float().mean().item()) if counts.numel() else 1.0


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``, with a clear error for anything else."""
    try:
        n_str, m_str = pattern.split(":")
        n, m = int(n_str), int(m_str)
    except (ValueError, AttributeError):
        raise ValueError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"N:M pattern needs 0 < N < M, got {pattern!r}")
    return n, m


def detect_pattern(zero_out_in: torch.Tensor) -> str:
    """Name the sparsity pattern of a ``(out, in)`` zero mask: ``"dense"``, ``"N:M"`` or ``"unstructured"``.

    An N:M pattern is reported when every block of M consecutive inputs holds at least N zeros; among the
    candidate block sizes the one with the largest N/M wins (ties go to the smaller M), so a 2:4 mask is
    reported as "2:4", not "4:8".
    """
    if not bool(zero_out_in.any()):
        return "dense"
    best: Optional[tuple[float, int, int]] = None
    for m in NM_BLOCK_SIZES:
        if zero_out_in.shape[-1] % m:
            continue
        n = int(zeros_per_group(zero_out_in, m).min().item())
        if n > 0 and (best is None or n / m > best[0]):
            best = (n / m, n, m)
    return f"{best[1]}:{best[2]}" if best else "unstructured"


@dataclass
class MaskRecord:
    """What we know about one weight's zero set: enough to verify it later without storing the mask."""

    shape: list[int]
    sparsity: float
    pattern: str
    fingerprint: str
    # Set when the weight was quantized (bitsandbytes settings): the record is of the dequantized weight, and a
    # full-precision base is checked by passing it through the same quantizer.
    quantization: Optional[dict] = None

    @property
    def is_dense(self) -> bool:
        return self.pattern == "dense"

    def to_dict(self) -> dict:
        record = asdict(self)
        if record["quantization"] is None:
            del record["quantization"]
        return record

    @classmethod
    def from_dict(cls, data: Mapping) -> "MaskRecord":
        return cls(
            shape=list(data["shape"]),
            sparsity=float(data["sparsity"]),
            pattern=str(data["pattern"]),
            fingerprint=str(data["fingerprint"]),
            quantization=dict(data["quantization"]) if data.get("quantization") else None,
        )


def describe_mask(weight: torch.Tensor, fan_in_fan_out: bool = False) -> MaskRecord:
    """Record the zero set of ``weight`` (sparsity, pattern along the input dimension, fingerprint)."""
    zeros = zero_mask(as_out_in(weight.detach(), fan_in_fan_out))
    return MaskRecord(
        shape=list(zeros.shape),
        sparsity=float(zeros.float().mean().item()) if zeros.numel() else 0.0,
        pattern=detect_pattern(zeros),
        fingerprint=mask_fingerprint(zeros),
    )


@dataclass
class ZeroSetChange:
    """How a weight's zero set changed: entries that were zero and are not (``filled``: always a bug),
    entries that were non-zero and are now zero (``new_zeros``: fp16/bf16 underflow or a factor of exactly 0)."""

    filled: int
    new_zeros: int

    @property
    def unchanged(self) -> bool:
        return self.filled == 0 and self.new_zeros == 0


def compare_zero_sets(zeros_before: torch.Tensor, weight_after: torch.Tensor) -> ZeroSetChange:
    """Compare a recorded zero mask with a weight of the same layout."""
    if tuple(zeros_before.shape) != tuple(weight_after.shape):
        raise ValueError(
            f"cannot compare zero sets of shapes {tuple(zeros_before.shape)} and {tuple(weight_after.shape)}"
        )
    zeros_after = zero_mask(weight_after.detach()).to(zeros_before.device)
    if torch.equal(zeros_before, zeros_after):  # the usual case: one comparison, no counting
        return ZeroSetChange(filled=0, new_zeros=0)
    filled = int(torch.count_nonzero(zeros_before & ~zeros_after))
    new_zeros = int(torch.count_nonzero(~zeros_before & zeros_after))
    return ZeroSetChange(filled=filled, new_zeros=new_zeros)


def zero_set_change(
    weight_before: torch.Tensor, weight_after: torch.Tensor, zeros_cannot_fill: bool = False,
    zeros_before: Optional[int] = None,
) -> ZeroSetChange:
    """How the zero set changed from ``weight_before`` to ``weight_after`` (same layout).

    With ``zeros_cannot_fill=True`` the caller guarantees, from the maths, that no zero of
    ``weight_before`` can be non-zero in ``weight_after`` (SPP's ``W * (1 + D)`` with a finite ``D``:
    ``0 * finite = 0``). The check then reads each weight once, counting non-zeros: no boolean masks, no
    element-wise comparison. Counts that contradict the guarantee (more non-zeros after than before) fall
    back to the full element-wise comparison, as does ``zeros_cannot_fill=False``. ``zeros_before``, when the
    caller already counted them (from the mask it just verified), saves reading ``weight_before`` again.
    """
    if zeros_cannot_fill:
        if zeros_before is None:
            zeros_before = weight_before.numel() - int(torch.count_nonzero(weight_before))
        zeros_after = weight_after.numel() - int(torch.count_nonzero(weight_after))
        if zeros_after >= zeros_before:
            return ZeroSetChange(filled=0, new_zeros=zeros_after - zeros_before)
    return compare_zero_sets(zero_mask(weight_before.detach()), weight_after)


CHECK_MODES = ("strict", "warn", "off")


def enforce_zero_set(name: str, change: ZeroSetChange, mode: str, action: str) -> Optional[str]:
    """Apply the integrity policy to one weight after ``action`` (e.g. "merge").

    A filled zero is an error in "strict" and "warn" mode (it breaks the sparsity guarantee); a new zero is
    an error in "strict" mode and a returned message in "warn" mode. "off" checks nothing.
    """
    if mode == "off" or change.unchanged:
        return None
    if change.filled:
        raise SparsityViolation(
            f"{action} of module '{name}' turned {change.filled} zero weight(s) of the pruned base into "
            f"non-zeros: the sparsity pattern is broken."
        )
    message = (
        f"{action} of module '{name}' turned {change.new_zeros} non-zero weight(s) into exact zeros "
        f"(dtype underflow or a multiplicative factor of exactly 0); the zero set is no longer the base's."
    )
    if mode == "strict":
        raise SparsityViolation(message + " Pass sparsity_check='warn' to accept this.")
    return message
