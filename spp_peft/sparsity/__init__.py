"""Sparsity masks: detection, fingerprints, reports and integrity assertions.

This module is the single home of every sparsity idea in the project (the zero set of a weight, its N:M
pattern, its fingerprint, and the comparison of two zero sets). The SPP tuner, the pruners, the pipeline
and the tests all call these functions; it imports none of them.

Conventions:
    * A weight is always looked at as ``(out_features, in_features)``. Weights stored the other way round
      (GPT-2's ``Conv1D``, ``fan_in_fan_out=True``) are transposed first by :func:`as_out_in`.
    * "N:M" means *N zeros in every group of M consecutive input weights of a row* (2:4 = 50% sparsity),
      the convention of NVIDIA's sparse tensor cores, Wanda and SparseGPT.
"""

from .masks import (
    CHECK_MODES,
    NM_BLOCK_SIZES,
    MaskRecord,
    SparsityViolation,
    ZeroSetChange,
    as_out_in,
    compare_zero_sets,
    conv1d_class,
    describe_mask,
    detect_pattern,
    enforce_zero_set,
    in_out_features,
    is_fan_in_fan_out,
    is_linear_like,
    mask_fingerprint,
    nm_compliance,
    parse_nm,
    zero_mask,
    zero_set_change,
    zeros_per_group,
)
from .report import LayerSparsity, SparsityReport, assert_same_sparsity, linear_weights, sparsity_report
