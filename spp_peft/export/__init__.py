"""Exporting merged sparse models: the verified safetensors export, and 2:4 semi-structured weights for the
GPU's sparse tensor cores.

``spp_peft.export.safetensors`` holds the verified, atomic export (and the zero-set checks it runs);
``spp_peft.export.sparse24`` holds the 2:4 conversion. Both are re-exported here.
"""

from . import safetensors, sparse24
from .safetensors import (
    SPARSITY_CONFIG_KEY,
    expected_pattern,
    export_merged,
    pruned_layers,
    sparsity_metadata,
    verify,
)
from .sparse24 import (
    LayerEligibility,
    Sparse24Report,
    Sparse24Unsupported,
    check_sparse24_support,
    sparse24_eligibility,
    to_sparse24,
)

__all__ = list(safetensors.__all__) + list(sparse24.__all__)
