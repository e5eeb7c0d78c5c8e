"""2:4 inference export: run the linears of a merged 2:4 model on the GPU's sparse tensor cores.

The reason to prune to 2:4 is faster inference: NVIDIA GPUs from Ampere on (compute capability >= 8.0)
multiply a 2:4 sparse matrix (two zeros in every four consecutive inputs of a row) at up to twice the dense
rate. PyTorch exposes this as ``torch.sparse.to_sparse_semi_structured``; :func:`to_sparse24` converts every
eligible linear of a model to it, after checking that the model really is 2:4 (SPP guarantees it: merging
an SPP adapter keeps every zero of the pruned base).

Typical use::

    merged = peft_model.merge_and_unload()                    # dense tensors, 2:4 zeros preserved
    report = spp_peft.export.to_sparse24(merged, dtype=torch.bfloat16)   # in place, on CUDA
    print(report.format())
    merged.generate(...)

Requirements (checked up front by :func:`check_sparse24_support`, each failure named in the error):
a CUDA device of compute capability >= 8.0, a torch build with semi-structured sparsity, and fp16 or bf16
weights. Eligibility per layer (checkable on CPU with :func:`sparse24_eligibility`): an ``nn.Linear``
(GPT-2's ``Conv1D`` is not supported), whose weight is 2:4 along the input dimension (via
:mod:`spp_peft.sparsity`) and whose shape is a multiple of the backend's block (CUTLASS: rows of 32,
columns of 64 for fp16/bf16; cuSPARSELt: 16 x 16). Layers that are not eligible stay dense and are listed
in the report (the output head and embeddings are never pruned, so they are skipped by default).

Semi-structured tensors are an in-memory inference format (no autograd for the weight, no safetensors):
save the merged dense model (its zeros compress well) and convert after loading.

Status: the CPU-side checks are tested everywhere; the conversion, its correctness test (``@pytest.mark.gpu``)
and ``benchmarks/bench_sparse24.py`` need a GPU and were not run in the session that wrote this module
(no GPU was available). See ``docs/scaling.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .._utils.targets import matches_target
from ..sparsity import is_fan_in_fan_out, is_linear_like, nm_compliance, zero_mask

__all__ = [
    "Sparse24Unsupported",
    "LayerEligibility",
    "Sparse24Report",
    "check_sparse24_support",
    "sparse24_eligibility",
    "to_sparse24",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
BACKENDS = ("auto", "cusparselt", "cutlass")


class Sparse24Unsupported(RuntimeError):
    """This machine / torch build cannot run semi-structured (2:4) sparse matmuls; the message says why."""


def _semi_structured_classes():
    try:
        from torch.sparse import (
            SparseSemiStructuredTensor,
            SparseSemiStructuredTensorCUSPARSELT,
            SparseSemiStructuredTensorCUTLASS,
            to_sparse_semi_structured,
        )
    except ImportError:
        return None
    return SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS, SparseSemiStructuredTensorCUSPARSELT, \
        to_sparse_semi_structured


def _cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except Exception:
        return False


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "cusparselt" if _cusparselt_available() else "cutlass"
    return backend


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"2:4 export supports float16 and bfloat16 weights, got {dtype}; pass dtype=torch.bfloat16 (or "
            "torch.float16): the sparse tensor cores have no fp32 path worth using"
        )


def check_sparse24_support(device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "auto") -> str:
    """Check that 2:4 sparse matmuls can run here; return the backend to use ("cusparselt" or "cutlass").

    Raises:
        ValueError: ``dtype`` is not fp16/bf16, or an unknown backend.
        Sparse24Unsupported: naming what is missing: torch's semi-structured sparsity, a CUDA device (with
            the torch build and the visible devices), compute capability >= 8.0, or cuSPARSELt when asked for.
    """
    _check_dtype(dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if _semi_structured_classes() is None:
        raise Sparse24Unsupported(
            f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured; 2:4 export needs torch >= 2.1"
        )
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
        raise Sparse24Unsupported(
            "2:4 export needs a CUDA GPU with compute capability >= 8.0 (NVIDIA Ampere or newer: A100, A10, "
            f"L4, RTX 30xx/40xx, H100/H200); none is available here (torch {torch.__version__}, {build} build, "
            f"CUDA_VISIBLE_DEVICES={_visible_devices()}). The merged model still runs dense anywhere."
        )
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        raise Sparse24Unsupported(f"2:4 export runs on CUDA devices only, got device={dev}")
    major, minor = torch.cuda.get_device_capability(dev)
    if (major, minor) < MIN_CAPABILITY:
        raise Sparse24Unsupported(
            f"2:4 sparse tensor cores need compute capability >= 8.0; {torch.cuda.get_device_name(dev)} ({dev}) "
            f"has {major}.{minor}. Run the merged model dense on this GPU, or use an Ampere-or-newer GPU."
        )
    resolved = _resolve_backend(backend)
    if backend == "cusparselt" and not _cusparselt_available():
        raise Sparse24Unsupported(
            f"backend='cusparselt' was requested but this torch build (torch {torch.__version__}) has no "
            "cuSPARSELt; use backend='auto' or 'cutlass'"
        )
    return resolved


def _visible_devices() -> str:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")


def _shape_constraints(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    classes = _semi_structured_classes()
    if classes is None:  # only reachable through sparse24_eligibility on a very old torch
        return (32, 64)
    cls = classes[2] if backend == "cusparselt" else classes[1]
    c = cls._DTYPE_SHAPE_CONSTRAINTS[dtype]
    return int(c.sparse_min_rows), int(c.sparse_min_cols)


@dataclass
class LayerEligibility:
    """Whether one linear can be converted: ``reason`` says why not (empty when eligible)."""

    name: str
    shape: tuple[int, int]
    eligible: bool
    reason: str = ""


def _merged_check(model: nn.Module) -> None:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # pragma: no cover - peft is a dependency
        return
    adapters = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    if adapters:
        raise ValueError(
            f"the model still has adapter layers (first: '{adapters[0]}'); 2:4 export works on the merged model: "
            "call model.merge_and_unload() first (merging an SPP adapter keeps the 2:4 zeros)"
        )


def sparse24_eligibility(
    model: nn.Module,
    *,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = ("lm_head",),
) -> list[LayerEligibility]:
    """Which linears of ``model`` can become 2:4 semi-structured tensors (runs anywhere, CPU included).

    Args:
        model: the merged model (``nn.Module``).
        dtype: the export dtype (fp16 / bf16), which fixes the backend's shape constraints.
        backend: "auto" (cuSPARSELt when torch has it, else CUTLASS), "cusparselt" or "cutlass".
        include: module names (suffix rule) to consider; default every linear-like layer.
        exclude: module names never considered (default: the output head).

    Returns:
        One :class:`LayerEligibility` per considered layer, in module order.
    """
    _check_dtype(dtype)
    min_rows, min_cols = _shape_constraints(_resolve_backend(backend), dtype)
    out = []
    for name, module in model.named_modules():
        if not is_linear_like(module) or (exclude and matches_target(name, list(exclude))):
            continue
        if include is not None and not matches_target(name, include):
            continue
        weight = module.weight
        if is_fan_in_fan_out(module):
            shape = (int(weight.shape[1]), int(weight.shape[0]))
            out.append(LayerEligibility(name, shape, False,
                                        "transformers Conv1D ((in, out) weights) is not supported; only nn.Linear"))
            continue
        rows, cols = (int(s) for s in weight.shape)
        reason = ""
        if rows < min_rows or rows % min_rows or cols < min_cols or cols % min_cols:
            reason = (f"shape {rows}x{cols} is not a multiple of the {_resolve_backend(backend)} block "
                      f"{min_rows}x{min_cols} for {str(dtype).replace('torch.', '')}")
        else:
            zeros = zero_mask(weight.detach())
            if not bool(zeros.any()):
                reason = "dense (no zero weight): not pruned"
            else:
                compliance = nm_compliance(zeros, 2, 4)
                if compliance < 1.0:
                    reason = (f"not 2:4: {1 - compliance:.2%} of the blocks of 4 inputs have fewer than 2 zeros "
                              "(converting would drop weights)")
        out.append(LayerEligibility(name, (rows, cols), not reason, reason))
    return out


@dataclass
class Sparse24Report:
    """What :func:`to_sparse24` did."""

    backend: str
    dtype: str
    device: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    dense_bytes: int = 0
    max_rel_error: Optional[float] = None

    def format(self) -> str:
        lines = [
            f"2:4 export ({self.backend}, {self.dtype}, {self.device}): {len(self.converted)} linear layer(s) "
            f"converted ({self.dense_bytes / 2**20:.1f} MiB of dense weights), {len(self.skipped)} left dense"
        ]
        if self.max_rel_error is not None:
            lines.append(f"largest relative output error of a converted layer on random inputs: "
                         f"{self.max_rel_error:.2e}")
        for name, reason in list(self.skipped.items())[:10]:
            lines.append(f"  dense: {name}: {reason}")
        if len(self.skipped) > 10:
            lines.append(f"  ... {len(self.skipped) - 10} more")
        return "\n".join(lines)


def to_sparse24(
    model: nn.Module,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = ("lm_head",),
    strict: bool = False,
    verify: bool = True,
    tolerance: float = 2e-2,
) -> Sparse24Report:
    """Convert the eligible linears of a merged 2:4 model to semi-structured sparse weights, in place.

    Every requirement is checked before the model is touched. The model is then moved to ``device``
    (default: the current CUDA device) and cast to ``dtype``; each eligible ``nn.Linear`` gets its weight
    replaced by ``torch.sparse.to_sparse_semi_structured(weight)`` (``F.linear`` dispatches to the sparse
    kernels; the model is for inference from then on).

    Args:
        model: the merged model (call ``merge_and_unload()`` on a PEFT model first).
        device, dtype: target CUDA device and fp16 / bf16.
        backend: "auto", "cusparselt" or "cutlass" (see :func:`check_sparse24_support`).
        include, exclude: which linears to consider (see :func:`sparse24_eligibility`).
        strict: raise if any considered layer is not eligible instead of leaving it dense.
        verify: check each converted layer against its dense weight on a random input (relative error).
        tolerance: the largest relative error ``verify`` accepts (bf16 rounding of two matmuls: ~1e-2).

    Returns:
        A :class:`Sparse24Report`.

    Raises:
        Sparse24Unsupported: no suitable GPU / torch build (nothing was changed).
        ValueError: an unmerged adapter, no eligible layer, or (``strict``) an ineligible layer.
        RuntimeError: a converted layer does not reproduce the dense output within ``tolerance``.
    """
    resolved = check_sparse24_support(device, dtype, backend)
    _merged_check(model)
    verdicts = sparse24_eligibility(model, dtype=dtype, backend=resolved, include=include, exclude=exclude)
    bad = [v for v in verdicts if not v.eligible]
    if strict and bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be exported as 2:4, first '{bad[0].name}': {bad[0].reason}")
    eligible = {v.name for v in verdicts if v.eligible}
    if not eligible:
        first = f" (first: '{bad[0].name}': {bad[0].reason})" if bad else ""
        raise ValueError(f"no linear layer of the model can be exported as 2:4{first}; is it pruned to 2:4?")

    classes = _semi_structured_classes()
    SparseSemiStructuredTensor, to_semi = classes[0], classes[3]
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = resolved == "cutlass"
    report = Sparse24Report(backend=resolved, dtype=str(dtype).replace("torch.", ""), device=str(dev),
                            skipped={v.name: v.reason for v in bad})
    worst = 0.0
    try:
        model.to(device=dev, dtype=dtype)
        for name, module in model.named_modules():
            if name not in eligible:
                continue
            dense = module.weight.detach().contiguous()
            sparse, err = _convert_layer(name, dense, to_semi, verify, tolerance, resolved)
            worst = max(worst, err)
            module.weight = nn.Parameter(sparse, requires_grad=False)
            report.converted.append(name)
            report.dense_bytes += dense.numel() * dense.element_size()
            del dense
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous
    report.max_rel_error = worst if verify else None
    return report


def _convert_layer(name: str, dense: torch.Tensor, to_semi, verify: bool, tolerance: float,
                   backend: str) -> tuple[torch.Tensor, float]:
    """The 2:4 semi-structured copy of one dense weight and (``verify``) its relative error on a random input."""
    try:
        sparse = to_semi(dense)
    except Exception as err:  # name the layer; torch's message says what it disliked
        raise RuntimeError(f"converting '{name}' ({tuple(dense.shape)}, {dense.dtype}) to 2:4 failed: {err}") from err
    if not verify:
        return sparse, 0.0
    with torch.no_grad():
        x = torch.randn(64, dense.shape[1], device=dense.device, dtype=dense.dtype)
        ref = nn.functional.linear(x, dense).float()
        got = nn.functional.linear(x, sparse).float()
        err = ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    if not err <= tolerance:
        raise RuntimeError(
            f"2:4 layer '{name}' does not reproduce its dense output: relative error {err:.3g} > {tolerance} "
            f"(backend {backend})"
        )
    return sparse, err
