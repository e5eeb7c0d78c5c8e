"""The single copy of each idea that several floors of spp-peft share.

- :mod:`.atomic`: the one way files and folders are written (temporary sibling + fsync + rename);
- :mod:`.tensors`: loading a folder of safetensors, a model's device, element counts, the dtype table;
- :mod:`.targets`: which modules a ``target_modules`` value names, with PEFT's semantics.

Weight orientation (``Conv1D`` stores ``(in, out)``) lives with the other weight ideas in
:mod:`spp_peft.sparsity` (:func:`~spp_peft.sparsity.in_out_features`, :func:`~spp_peft.sparsity.is_fan_in_fan_out`).
"""

from .atomic import (
    OutputBusyError,
    OutputExistsError,
    atomic_write_dir,
    atomic_write_file,
    check_output,
    clean_stale,
    exclusive,
)
from .targets import matches_target
from .tensors import DTYPES, load_safetensors_folder, model_device, numel, parse_dtype

__all__ = [
    "OutputBusyError",
    "OutputExistsError",
    "atomic_write_dir",
    "atomic_write_file",
    "check_output",
    "clean_stale",
    "exclusive",
    "matches_target",
    "DTYPES",
    "load_safetensors_folder",
    "model_device",
    "numel",
    "parse_dtype",
]
