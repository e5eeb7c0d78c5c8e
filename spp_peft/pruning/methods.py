"""The one registry of pruning methods: what each needs from the calibration data and how it prunes a layer.

:func:`spp_peft.pruning.prune` dispatches through :data:`REGISTRY`, and :class:`PruningConfig` validates
method names against it, so a new method is one entry here (plus its own module), not a branch in each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from spp_peft.pruning.magnitude import prune_magnitude
from spp_peft.pruning.sparsegpt import HessianStats, sparsegpt_prune
from spp_peft.pruning.wanda import InputNormStats, prune_wanda

if TYPE_CHECKING:
    from spp_peft.pruning.config import PruningConfig

#: ``statistics(in_features, device)``: a collector of one layer's inputs, with ``add_batch(inputs)``.
StatisticsFactory = Callable[[int, torch.device], Any]
#: ``prune(weight, statistics, config)``: the pruned ``(out, in)`` weight (``statistics`` is ``None``
#: for a method without calibration).
PruneFn = Callable[[torch.Tensor, Any, "PruningConfig"], torch.Tensor]


@dataclass(frozen=True)
class PruningMethod:
    """How one method prunes.

    Attributes:
        prune: the layer pruner, with the uniform signature ``(weight, statistics, config) -> weight``.
        statistics: builds the per-layer statistics of the calibration inputs; ``None``: the method needs
            no calibration data (its weights alone decide).
        options: the :class:`PruningConfig` fields besides sparsity and pattern that the method reads; the
            others are recorded as ``None`` in the pruning metadata.
    """

    prune: PruneFn
    statistics: Optional[StatisticsFactory] = None
    options: tuple[str, ...] = ()

    @property
    def needs_calibration(self) -> bool:
        return self.statistics is not None


def _magnitude(weight: torch.Tensor, stats: None, config: "PruningConfig") -> torch.Tensor:
    return prune_magnitude(weight, float(config.sparsity), config.nm, config.comparison)


def _wanda(weight: torch.Tensor, stats: InputNormStats, config: "PruningConfig") -> torch.Tensor:
    return prune_wanda(weight, stats, float(config.sparsity), config.nm)


def _sparsegpt(weight: torch.Tensor, stats: HessianStats, config: "PruningConfig") -> torch.Tensor:
    new, _ = sparsegpt_prune(
        weight, stats.hessian(), float(config.sparsity), config.nm, config.effective_blocksize, config.percdamp
    )
    return new


REGISTRY: dict[str, PruningMethod] = {
    "magnitude": PruningMethod(prune=_magnitude, options=("comparison",)),
    "wanda": PruningMethod(prune=_wanda, statistics=InputNormStats),
    "sparsegpt": PruningMethod(prune=_sparsegpt, statistics=HessianStats, options=("blocksize", "percdamp")),
}

#: The method names, in the registry's order.
METHODS = tuple(REGISTRY)


def get_method(name: str) -> PruningMethod:
    """The registry entry of ``name``; ``ValueError`` naming the known methods otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"pruning method must be one of {METHODS}, got {name!r}") from None
