"""SPP on a quantized base (QLoRA-style): bitsandbytes ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt``.

The frozen base stays quantized; the SPP factors train in full precision. Each forward dequantizes the base
once for the SPP kernel, and backward dequantizes it again instead of keeping the copy alive (see
:func:`spp_peft.kernel.spp_linear`), as bitsandbytes' own 4-bit matmul does.

Zeros and quantization. A zero weight maps to the exact-zero code of NF4, FP4 and row-wise int8, so the
dequantized base keeps every zero of the pruned model, and merging (dequantize, ``W * (1 + D)`` in fp32,
requantize) keeps them too: a filled zero is always an error. Quantization can *add* zeros (small weights
round to 0, more so after requantizing ``W * (1 + D)``); by default those are counted and reported per layer
(``SPPModel.merge_report``), an error only when ``sparsity_check="strict"`` is set explicitly. Masks are
recorded and checked on the dequantized weight.

The CPU trap: on CPUs with AVX512-BF16, ``Linear4bit``'s eval-mode forward repacks the weight in place into a
CPU-only layout after which dequantization silently returns wrong values (and merges fill zeros). Every
wrapped ``Linear4bit`` gets ``support_avx512bf16_for_cpu = False`` at wrap time.

Modelled on PEFT's ``tuners/lora/bnb.py`` and ``tuners/hira/bnb.py``.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
from torch import nn

from .layer import Linear


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def quantized_kind(module: nn.Module) -> Optional[str]:
    """``"4bit"``, ``"8bit"`` or ``None`` for a (base) layer, without importing bitsandbytes needlessly."""
    if not bnb_available() or "bitsandbytes" not in type(module).__module__:
        return None
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def guard_cpu_repacking(module: nn.Module) -> None:
    """Keep a ``Linear4bit`` from repacking its weight into the CPU-only layout (see the module docstring)."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a dense ``(out, in)`` tensor: dequantized for bitsandbytes layers."""
    kind = quantized_kind(module)
    if kind is None:
        return module.weight
    # Linear8bitLt moves the row scales from the weight into its state at the first forward.
    scales = module.weight.SCB if kind == "8bit" and module.weight.SCB is not None else getattr(
        getattr(module, "state", None), "SCB", None)
    return dequantize_param(module.weight, scales)


def dequantize_param(weight, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A bitsandbytes ``Params4bit`` / ``Int8Params`` as a dense tensor (8-bit: with its row scales)."""
    from types import SimpleNamespace

    from peft.utils.integrations import dequantize_bnb_weight

    if type(weight).__name__ == "Params4bit":
        return dequantize_bnb_weight(weight, state=weight.quant_state)
    return dequantize_bnb_weight(weight, state=SimpleNamespace(SCB=scales if scales is not None else weight.SCB))


def quantize_like(module: nn.Module, dense: torch.Tensor):
    """``dense`` quantized with the settings of ``module``'s weight (a new parameter; nothing is written)."""
    import bitsandbytes as bnb

    weight = module.weight
    if quantized_kind(module) == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
        kwargs.update(bnb_quantized=False, requires_grad=False)
        kwargs.pop("quant_state", None)
        kwargs.pop("module", None)
        return bnb.nn.Params4bit(dense.to("cpu"), **kwargs).to(weight.device)
    return bnb.nn.Int8Params(dense.to("cpu"), requires_grad=False,
                             has_fp16_weights=weight.has_fp16_weights).to(weight.device)


def quantization_settings(module: nn.Module) -> Optional[dict]:
    """The bitsandbytes settings a mask record needs to reproduce this layer's quantization, or None."""
    kind = quantized_kind(module)
    if kind == "4bit":
        weight = module.weight
        return {"kind": "4bit", "quant_type": weight.quant_type, "blocksize": int(weight.blocksize),
                "compress_statistics": bool(weight.compress_statistics)}
    return {"kind": "8bit"} if kind == "8bit" else None


def through_quantizer(dense: torch.Tensor, settings: dict) -> torch.Tensor:
    """``dense`` quantized with ``settings`` and dequantized again: what a quantized copy of a full-precision
    base reads. Deterministic, so an adapter trained on the quantized model can be checked against the
    full-precision pruned base it came from (the usual QLoRA deployment)."""
    import bitsandbytes as bnb

    data = dense.detach().to("cpu", torch.float32)
    if settings["kind"] == "4bit":
        param = bnb.nn.Params4bit(data, requires_grad=False, quant_type=settings["quant_type"],
                                  blocksize=settings["blocksize"], compress_statistics=settings["compress_statistics"])
    else:
        param = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False)
    return dequantize_param(param.to("cpu"))


class QuantizedLinear(Linear):
    """SPP on a bitsandbytes ``Linear4bit`` or ``Linear8bitLt``: the same adapter, the base read through
    dequantization and written back through requantization."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, **kwargs) -> None:
        guard_cpu_repacking(base_layer)
        super().__init__(base_layer, adapter_name, **kwargs)

    @property
    def quantized(self) -> Optional[str]:
        return quantized_kind(self.get_base_layer())

    def _dense_weight(self) -> torch.Tensor:
        return dequantized_weight(self.get_base_layer())

    def record_mask(self):
        record = super().record_mask()
        record.quantization = quantization_settings(self.get_base_layer())
        return record

    def _store(self, dense: torch.Tensor):
        return quantize_like(self.get_base_layer(), dense)

    def _stored_dense(self, stored) -> torch.Tensor:
        return dequantize_param(stored)

    def _write(self, stored) -> None:
        base = self.get_base_layer()
        base.weight = stored
        if self.quantized == "8bit":
            base.state.reset_grads()
            base.state.SCB = stored.SCB
        guard_cpu_repacking(base)

    def _base_compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        compute = getattr(self.get_base_layer(), "compute_dtype", None)
        return compute if compute is not None and compute.is_floating_point else x.dtype

    def _kernel_weight(self, dtype: torch.dtype):
        return lambda: self._dense_weight().to(dtype)

    def _base_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_base_layer()(x).to(x.dtype)
