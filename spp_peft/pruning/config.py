"""The settings of a pruning run, validated when built (the recipe's ``pruning:`` section maps onto them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Union

from spp_peft.pruning.common import MAX_UNSTRUCTURED_SPARSITY, UNSTRUCTURED, parse_pattern
from spp_peft.pruning.magnitude import COMPARISONS
from spp_peft.pruning.methods import PruningMethod, get_method


@dataclass
class PruningConfig:
    """Everything that defines a pruning run (the recipe's ``pruning:`` section maps onto it).

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: fraction of weights to zero per layer for ``pattern="unstructured"``, in ``[0, 0.95]``.
            For N:M patterns the fraction is ``N/M`` and this value is not used.
        pattern: ``"unstructured"`` or ``"N:M"`` (``"2:4"``: 2 zeros in every 4 consecutive inputs of a row).
        target_modules: which linear layers of the decoder blocks to prune (PEFT semantics: name suffixes
            or a full-name regex); ``None`` = all of them.
        comparison: magnitude only: rank weights per output ``"row"`` or over the whole ``"layer"``.
        blocksize: SparseGPT columns per lazy-update block; for N:M it is rounded down to a multiple of M
            (at least M) so that no group straddles two blocks.
        percdamp: SparseGPT dampening, fraction of the mean Hessian diagonal.
        batch_size: calibration windows per forward pass.
        calibration_source: free-text description of the calibration data, stored in the metadata.
        seed: the calibration sampling seed, stored in the metadata.
    """

    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str = UNSTRUCTURED
    target_modules: Optional[Union[str, list[str]]] = None
    comparison: str = "row"
    blocksize: int = 128
    percdamp: float = 0.01
    batch_size: int = 8
    calibration_source: Optional[str] = None
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        get_method(self.method)
        nm = parse_pattern(self.pattern)
        if nm is None and not (0.0 <= float(self.sparsity) <= MAX_UNSTRUCTURED_SPARSITY):
            raise ValueError(
                f"unstructured sparsity must be in [0, {MAX_UNSTRUCTURED_SPARSITY}], got {self.sparsity!r}"
            )
        if self.comparison not in COMPARISONS:
            raise ValueError(f"comparison must be one of {COMPARISONS}, got {self.comparison!r}")
        if self.blocksize <= 0:
            raise ValueError(f"blocksize must be positive, got {self.blocksize}")
        if not 0.0 <= self.percdamp:
            raise ValueError(f"percdamp must be >= 0, got {self.percdamp}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern)

    @property
    def effective_blocksize(self) -> int:
        """``blocksize`` rounded down to a multiple of M for N:M patterns (at least M)."""
        nm = self.nm
        return max(nm[1], self.blocksize - self.blocksize % nm[1]) if nm else self.blocksize

    @property
    def effective_sparsity(self) -> float:
        """The fraction of each pruned layer that is zeroed: ``sparsity`` or ``N/M``."""
        nm = self.nm
        return nm[0] / nm[1] if nm else float(self.sparsity)

    @property
    def pruning_method(self) -> PruningMethod:
        """The registry entry of :attr:`method`."""
        return get_method(self.method)

    @property
    def needs_calibration(self) -> bool:
        return self.pruning_method.needs_calibration

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pruning option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))
