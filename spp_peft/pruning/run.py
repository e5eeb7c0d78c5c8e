"""Pruning a decoder: find the target layers, then let the method's registry entry prune them block by block.

A method without calibration prunes each layer from its weights alone; one with calibration statistics
runs the calibration tokens through the decoder one block at a time (:mod:`spp_peft.pruning.calibration`),
so that block ``i + 1`` is calibrated on the outputs of the already-pruned blocks ``0..i``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from spp_peft._utils.progress import progress
from spp_peft.models import find_decoder_blocks, find_linears
from spp_peft.pruning.calibration import BlockInputs, collect_inputs, run_blocks
from spp_peft.pruning.common import UNSTRUCTURED, read_weight, write_weight
from spp_peft.pruning.config import PruningConfig
from spp_peft.pruning.result import LayerPruning, PruningResult
from spp_peft.sparsity import detect_pattern, in_out_features, sparsity_report, zero_mask

logger = logging.getLogger(__name__)

#: ``{block index: {full name: layer}}``: the layers to prune, grouped by decoder block.
LayersByBlock = dict[int, dict[str, nn.Module]]
Device = Optional[Union[str, torch.device]]


def _target_layers(model: nn.Module, config: PruningConfig) -> LayersByBlock:
    """The linear layers of the decoder blocks that ``config`` targets, validated for its pattern."""
    blocks_name, blocks = find_decoder_blocks(model)
    prefix = blocks_name + "."
    per_block: LayersByBlock = {i: {} for i in range(len(blocks))}
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
    if config.nm is not None:
        # Checked for every layer before any weight changes: a half-pruned model is worse than an error.
        for layers in per_block.values():
            for name, layer in layers.items():
                _check_holds_pattern(name, layer, config)
    return per_block


def _check_holds_pattern(name: str, layer: nn.Module, config: PruningConfig) -> None:
    in_features, out_features = in_out_features(layer)
    m = config.nm[1]
    if in_features % m:
        raise ValueError(
            f"module '{name}' (weight (out, in) = ({out_features}, {in_features})) cannot hold the "
            f"{config.pattern} pattern: in_features={in_features} is not divisible by M={m}; "
            "exclude it with target_modules or choose another pattern"
        )


def _prune_layers(
    layers: dict[str, nn.Module],
    config: PruningConfig,
    device: Optional[torch.device],
    stats: Optional[dict[str, Any]] = None,
) -> list[LayerPruning]:
    """Prune each layer with the method of ``config`` (on ``device``) and record what it did."""
    records = []
    for name, layer in layers.items():
        start = time.perf_counter()
        layer_stats = stats[name] if stats is not None else None
        write_weight(layer, config.pruning_method.prune(read_weight(layer, device), layer_stats, config))
        if stats is not None:
            stats[name] = layer_stats = None  # free the Hessian before the next layer's
        zeros = zero_mask(read_weight(layer))
        records.append(
            LayerPruning(
                name=name,
                shape=list(zeros.shape),
                zeros=int(zeros.sum()),
                pattern=detect_pattern(zeros),
                seconds=time.perf_counter() - start,
            )
        )
    return records


def _prune_without_calibration(
    per_block: LayersByBlock, config: PruningConfig, device: Device, show_progress: bool, desc: str
) -> list[LayerPruning]:
    records: list[LayerPruning] = []
    compute = torch.device(device) if device else None
    for index in progress(range(len(per_block)), show_progress, desc=desc, unit="block"):
        records += _prune_layers(per_block[index], config, compute)
    return records


def _prune_with_calibration(
    model: nn.Module,
    per_block: LayersByBlock,
    config: PruningConfig,
    calibration: torch.Tensor,
    device: Device,
    show_progress: bool,
    desc: str,
) -> list[LayerPruning]:
    records: list[LayerPruning] = []
    statistics = config.pruning_method.statistics

    def process_block(index: int, block_name: str, block: nn.Module, inputs: BlockInputs) -> None:
        layers = per_block[index]
        if not layers:
            return
        compute = next(block.parameters()).device

        def make(layer: nn.Module):
            return statistics(in_out_features(layer)[0], compute)

        # All layers of the block see the dense block's inputs, as in the reference implementations.
        stats = collect_inputs(block, inputs, layers, make, compute)
        records.extend(_prune_layers(layers, config, compute, stats))

    run_blocks(
        model,
        calibration,
        process_block,
        device=device,
        batch_size=config.batch_size,
        show_progress=show_progress,
        desc=desc,
    )
    return records


def prune_with_config(
    model: nn.Module,
    config: PruningConfig,
    calibration: Optional[torch.Tensor] = None,
    device: Device = None,
    show_progress: bool = True,
) -> PruningResult:
    """Prune ``model`` in place as described by ``config`` (see :func:`prune` for the arguments)."""
    start = time.perf_counter()
    per_block = _target_layers(model, config)
    nm = config.nm
    desc = f"{config.method} {config.pattern if nm else f'{float(config.sparsity):.0%}'}"
    nsamples = seqlen = 0
    if not config.needs_calibration:
        if calibration is not None:
            logger.info("%s pruning ignores the calibration data", config.method)
        records = _prune_without_calibration(per_block, config, device, show_progress, desc)
    else:
        if calibration is None:
            raise ValueError(
                f"{config.method} needs calibration data: pass calibration=a (nsamples, seqlen) LongTensor of "
                "token ids (spp_peft.data.calibration_windows), or use method='magnitude'"
            )
        if calibration.dim() == 2:
            nsamples, seqlen = (int(s) for s in calibration.shape)
        records = _prune_with_calibration(model, per_block, config, calibration, device, show_progress, desc)
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
    device: Device = None,
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
