"""Exporting merged sparse models: 2:4 semi-structured weights for the GPU's sparse tensor cores.

``spp_peft.export.sparse24`` holds the 2:4 conversion (re-exported here).
"""

from . import sparse24
from .sparse24 import (
    LayerEligibility,
    Sparse24Report,
    Sparse24Unsupported,
    check_sparse24_support,
    sparse24_eligibility,
    to_sparse24,
)

__all__ = list(sparse24.__all__)
