"""Small tensor-side helpers used on several floors: safetensors folders, devices, sizes, dtype names."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Union

import torch
from torch import nn

#: dtype names accepted in recipes and on the command line (the short forms are the usual aliases).
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    """The torch dtype a name (or dtype) stands for; ``ValueError`` naming the choices otherwise."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {str(name)[:40]!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def load_safetensors_folder(folder: Union[str, os.PathLike], pattern: str = "*.safetensors") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files matching ``pattern`` in ``folder`` (shards merged), on CPU.

    Raises:
        FileNotFoundError: no such file in ``folder``.
    """
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob(pattern))
    if not files:
        raise FileNotFoundError(f"{folder}: no {pattern} file")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a model without parameters)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def numel(shape: Iterable[int]) -> int:
    """The number of elements of a tensor of ``shape``."""
    total = 1
    for size in shape:
        total *= int(size)
    return total
