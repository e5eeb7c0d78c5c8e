"""One-shot pruning of HuggingFace decoders: magnitude, Wanda and SparseGPT, unstructured or N:M.

>>> from spp_peft.pruning import prune, save_pruned
>>> result = prune(model, method="wanda", sparsity=0.5, calibration=ids)      # ids: (nsamples, seqlen)
>>> result = prune(model, method="sparsegpt", pattern="2:4", calibration=ids)
>>> print(result.report.format())

Only the linear layers inside the decoder blocks are pruned (embeddings and ``lm_head`` stay dense, as in
the papers). The pruned model is an ordinary dense-storage model whose zeros are the pruning mask; its
metadata lives in ``model.config.spp_pruning`` so that later stages (the SPP adapter, reports) can read it.

References:
    * Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks" (magnitude).
    * Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models" (Wanda).
    * Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot".
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from spp_peft._utils import atomic_write_dir
from spp_peft.models import find_decoder_blocks, find_linears
from spp_peft.pruning.calibration import collect_inputs, run_blocks
from spp_peft.pruning.common import (
    MAX_UNSTRUCTURED_SPARSITY,
    UNSTRUCTURED,
    in_out_features,
    parse_pattern,
    read_weight,
    write_weight,
)
from spp_peft.pruning.magnitude import COMPARISONS, prune_magnitude
from spp_peft.pruning.sparsegpt import HessianStats, sparsegpt_prune
from spp_peft.pruning.wanda import InputNormStats, prune_wanda
from spp_peft.sparsity import SparsityReport, detect_pattern, sparsity_report, zero_mask

logger = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda", "sparsegpt")
#: Key of the pruning metadata in ``model.config``.
CONFIG_KEY = "spp_pruning"

__all__ = [
    "METHODS",
    "CONFIG_KEY",
    "PruningConfig",
    "LayerPruning",
    "PruningResult",
    "prune",
    "prune_with_config",
    "save_pruned",
    "pruning_metadata",
]


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
        if self.method not in METHODS:
            raise ValueError(f"pruning method must be one of {METHODS}, got {self.method!r}")
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
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruningConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pruning option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


@dataclass
class LayerPruning:
    """What pruning did to one layer (shape is ``(out, in)``)."""

    name: str
    shape: list[int]
    zeros: int
    pattern: str
    seconds: float

    @property
    def sparsity(self) -> float:
        total = self.shape[0] * self.shape[1]
        return self.zeros / total if total else 0.0


@dataclass
class PruningResult:
    """The outcome of :func:`prune`: per-layer information, wall time and the model's sparsity report."""

    config: PruningConfig
    layers: list[LayerPruning]
    seconds: float
    report: SparsityReport
    nsamples: int = 0
    seqlen: int = 0

    def metadata(self) -> dict:
        """The JSON-able dict stored in ``model.config.spp_pruning`` (see :func:`pruning_metadata`)."""
        from spp_peft import __version__

        cfg = self.config
        return {
            "method": cfg.method,
            "sparsity": cfg.effective_sparsity,
            "pattern": cfg.pattern,
            "comparison": cfg.comparison if cfg.method == "magnitude" else None,
            "target_modules": cfg.target_modules,
            "calibration": {
                "source": cfg.calibration_source,
                "nsamples": self.nsamples,
                "seqlen": self.seqlen,
                "seed": cfg.seed,
            }
            if cfg.needs_calibration
            else None,
            "blocksize": cfg.effective_blocksize if cfg.method == "sparsegpt" else None,
            "percdamp": cfg.percdamp if cfg.method == "sparsegpt" else None,
            "pruned_layers": [layer.name for layer in self.layers],
            "total_sparsity_of_pruned_layers": self._pruned_sparsity(),
            "seconds": round(self.seconds, 3),
            "spp_peft_version": __version__,
        }

    def _pruned_sparsity(self) -> float:
        total = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "seconds": self.seconds,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "layers": [dict(asdict(layer), sparsity=layer.sparsity) for layer in self.layers],
            "report": self.report.to_dict(),
        }


def _target_layers(model: nn.Module, config: PruningConfig) -> tuple[str, int, dict[int, dict[str, nn.Module]]]:
    """``(blocks name, number of blocks, {block index: {full name: layer}})``, validated for the pattern."""
    blocks_name, blocks = find_decoder_blocks(model)
    prefix = blocks_name + "."
    per_block: dict[int, dict[str, nn.Module]] = {i: {} for i in range(len(blocks))}
    for name, layer in find_linears(model, config.target_modules).items():
        if not name.startswith(prefix):
            continue  # outside the decoder blocks (lm_head, a vision tower, ...): never pruned
        index = int(name[len(prefix) :].split(".", 1)[0])
        per_block[index][name] = layer
    if not any(per_block.values()):
        available = list(find_linears(blocks[0]))[:8]
        raise ValueError(
            f"no linear layer of the decoder blocks '{blocks_name}' matches target_modules="
            f"{config.target_modules!r}; block 0 has: {available}"
        )
    nm = config.nm
    if nm is not None:
        # Checked for every layer before any weight changes: a half-pruned model is worse than an error.
        for layers in per_block.values():
            for name, layer in layers.items():
                in_features, out_features = in_out_features(layer)
                if in_features % nm[1]:
                    raise ValueError(
                        f"module '{name}' (weight (out, in) = ({out_features}, {in_features})) cannot hold the "
                        f"{config.pattern} pattern: in_features={in_features} is not divisible by M={nm[1]}; "
                        "exclude it with target_modules or choose another pattern"
                    )
    return blocks_name, len(blocks), per_block


def _record(name: str, layer: nn.Module, seconds: float) -> LayerPruning:
    zeros = zero_mask(read_weight(layer))
    return LayerPruning(
        name=name, shape=list(zeros.shape), zeros=int(zeros.sum()), pattern=detect_pattern(zeros), seconds=seconds
    )


def prune_with_config(
    model: nn.Module,
    config: PruningConfig,
    calibration: Optional[torch.Tensor] = None,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> PruningResult:
    """Prune ``model`` in place as described by ``config`` (see :func:`prune` for the arguments)."""
    start = time.perf_counter()
    blocks_name, num_blocks, per_block = _target_layers(model, config)
    nm = config.nm
    sparsity = float(config.sparsity)
    records: list[LayerPruning] = []
    desc = f"{config.method} {config.pattern if nm else f'{sparsity:.0%}'}"

    if not config.needs_calibration:
        if calibration is not None:
            logger.info("magnitude pruning ignores the calibration data")
        for index in tqdm(range(num_blocks), desc=desc, unit="block", disable=not show_progress):
            for name, layer in per_block[index].items():
                t0 = time.perf_counter()
                weight = read_weight(layer, device=torch.device(device) if device else None)
                write_weight(layer, prune_magnitude(weight, sparsity, nm, config.comparison))
                records.append(_record(name, layer, time.perf_counter() - t0))
        nsamples = seqlen = 0
    else:
        if calibration is None:
            raise ValueError(
                f"{config.method} needs calibration data: pass calibration=a (nsamples, seqlen) LongTensor of "
                "token ids (spp_peft.data.calibration_windows), or use method='magnitude'"
            )
        nsamples, seqlen = (int(s) for s in calibration.shape) if calibration.dim() == 2 else (0, 0)

        def process_block(index: int, block_name: str, block: nn.Module, inputs) -> None:
            layers = per_block[index]
            if not layers:
                return
            compute = next(block.parameters()).device
            if config.method == "wanda":
                make = lambda layer: InputNormStats(in_out_features(layer)[0], compute)  # noqa: E731
            else:
                make = lambda layer: HessianStats(in_out_features(layer)[0], compute)  # noqa: E731
            # All layers of the block see the dense block's inputs, as in the reference implementations.
            stats = collect_inputs(block, inputs, layers, make, compute)
            for name, layer in layers.items():
                t0 = time.perf_counter()
                weight = read_weight(layer, compute)
                if config.method == "wanda":
                    new = prune_wanda(weight, stats[name], sparsity, nm)
                else:
                    new, _ = sparsegpt_prune(
                        weight, stats[name].hessian(), sparsity, nm, config.effective_blocksize, config.percdamp
                    )
                write_weight(layer, new)
                stats[name] = None  # free the Hessian before the next layer's
                records.append(_record(name, layer, time.perf_counter() - t0))

        run_blocks(
            model,
            calibration,
            process_block,
            device=device,
            batch_size=config.batch_size,
            show_progress=show_progress,
            desc=desc,
        )

    report = sparsity_report(model, include=[r.name for r in records], expected_pattern=config.pattern if nm else None)
    return PruningResult(
        config=config,
        layers=records,
        seconds=time.perf_counter() - start,
        report=report,
        nsamples=nsamples,
        seqlen=seqlen,
    )


def prune(
    model: nn.Module,
    method: str = "wanda",
    sparsity: float = 0.5,
    pattern: str = UNSTRUCTURED,
    calibration: Optional[torch.Tensor] = None,
    target_modules: Optional[Union[str, Sequence[str]]] = None,
    device: Optional[Union[str, torch.device]] = None,
    comparison: str = "row",
    blocksize: int = 128,
    percdamp: float = 0.01,
    show_progress: bool = True,
    batch_size: int = 8,
    calibration_source: Optional[str] = None,
    seed: Optional[int] = None,
) -> PruningResult:
    """Prune the linear layers of a decoder's blocks in place.

    Args:
        model: a HuggingFace causal LM (any decoder: Llama, Mistral, Qwen2, Gemma, Phi, GPT-2, OPT, ...).
        method: ``"magnitude"``, ``"wanda"`` (Sun et al., 2023) or ``"sparsegpt"`` (Frantar & Alistarh, 2023).
        sparsity: fraction zeroed per layer for unstructured pruning, in ``[0, 0.95]``.
        pattern: ``"unstructured"`` or ``"N:M"`` such as ``"2:4"`` (N zeros in every M consecutive inputs).
        calibration: ``(nsamples, seqlen)`` LongTensor of token ids, required by wanda and sparsegpt
            (see :func:`spp_peft.data.calibration_windows`); ignored by magnitude.
        target_modules: layers to prune (PEFT semantics); ``None`` = every linear layer of the blocks.
        device: compute device (e.g. ``"cuda"``); the model stays where it is and only the current block
            visits the device. Default: the model's device.
        comparison: magnitude only, ``"row"`` or ``"layer"``.
        blocksize, percdamp: SparseGPT's lazy-update block size and dampening.
        show_progress: tqdm bar over the blocks.
        batch_size: calibration windows per forward pass.
        calibration_source, seed: descriptions stored in the pruning metadata.

    Returns:
        a :class:`PruningResult`.

    Raises:
        ValueError: unknown method/pattern, sparsity out of range, a layer that cannot hold the N:M pattern,
            missing calibration data, or an unsupported architecture.
    """
    config = PruningConfig(
        method=method,
        sparsity=sparsity,
        pattern=pattern,
        target_modules=list(target_modules) if isinstance(target_modules, (list, tuple)) else target_modules,
        comparison=comparison,
        blocksize=blocksize,
        percdamp=percdamp,
        batch_size=batch_size,
        calibration_source=calibration_source,
        seed=seed,
    )
    return prune_with_config(model, config, calibration, device=device, show_progress=show_progress)


def pruning_metadata(model: nn.Module) -> Optional[dict]:
    """The pruning metadata stored by :func:`save_pruned` / :func:`attach_metadata`, or ``None``."""
    value = getattr(model.config, CONFIG_KEY, None)
    return dict(value) if value else None


def attach_metadata(model: nn.Module, result: PruningResult) -> dict:
    """Store ``result.metadata()`` in ``model.config.spp_pruning`` and return it."""
    meta = result.metadata()
    setattr(model.config, CONFIG_KEY, meta)
    return meta


def save_pruned(
    model: nn.Module,
    tokenizer,
    out_dir: Union[str, os.PathLike],
    result: Optional[PruningResult],
    overwrite: bool = False,
) -> Path:
    """Save a pruned model (safetensors) and tokenizer with its pruning metadata, atomically.

    The files are written to a temporary folder next to ``out_dir`` and renamed into place
    (:func:`spp_peft._utils.atomic_write_dir`), so ``out_dir`` is either the old folder or the complete new
    one, never half-written; of two concurrent saves without ``overwrite`` exactly one succeeds.

    Args:
        model: the pruned model.
        tokenizer: its tokenizer (``None`` to skip).
        out_dir: destination folder.
        result: the :class:`PruningResult` of the pruning run; its metadata goes to ``config.spp_pruning``
            (``None``: a model pruned elsewhere, saved with the metadata it already has).
        overwrite: replace an existing non-empty ``out_dir`` (otherwise :class:`~spp_peft._utils.OutputExistsError`).

    Returns:
        ``out_dir`` as a ``Path``.
    """
    if result is not None:
        attach_metadata(model, result)
    with atomic_write_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir).expanduser()
