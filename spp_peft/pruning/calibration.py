"""Run calibration data through a decoder one block at a time (the scheme of SparseGPT and Wanda).

1. :func:`capture_block_inputs` runs the model on the calibration tokens until the first decoder block
   is called and records *everything* that block receives: the hidden states plus every other positional
   and keyword argument the installed transformers version passes (attention mask, position ids, rotary
   ``position_embeddings`` computed by the model, cache objects, ...). A forward pre-hook on block 0 records
   them and raises, so nothing after the embeddings is computed; no model-specific code is needed.
2. :func:`run_blocks` then, for each block in turn: moves it to the compute device, lets the caller collect
   statistics from forward passes over the block's own inputs and prune it, recomputes the block's
   outputs *with the pruned weights*, and feeds them to the next block. Only the current block and one
   batch of activations are on the compute device; the rest of the model stays where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from spp_peft._utils.progress import progress
from spp_peft._utils.tensors import model_device
from spp_peft.models import find_decoder_blocks


class _InputsCaptured(Exception):
    """Raised by the capture hook to stop the forward pass once block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """The inputs of one decoder block, batch by batch.

    ``hidden[b]`` is the hidden-state tensor of batch ``b`` (kept on the storage device, CPU by default);
    ``args[b]`` / ``kwargs[b]`` are the other arguments, exactly as the model passed them (on the compute
    device; they are small: masks and rotary tables).
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


def _move_outside(model: nn.Module, blocks_name: str, device: torch.device) -> None:
    """Move every parameter and buffer of ``model`` that is not inside the decoder blocks to ``device``.

    Parameters are moved in place (``.data``), so tied weights (embeddings / ``lm_head``) stay tied.
    """
    prefix = blocks_name + "."
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(prefix):
            continue
        for param in module.parameters(recurse=False):
            if param.device != device:
                param.data = param.data.to(device)
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)


def _block_output(output: Any) -> torch.Tensor:
    # Decoder blocks return the hidden states (transformers >= 5) or a tuple starting with them (older).
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    batch_size: int = 8,
    device: Optional[torch.device] = None,
    storage_device: Optional[torch.device] = None,
) -> tuple[str, nn.ModuleList, BlockInputs]:
    """Record the inputs of the first decoder block for the calibration tokens.

    Args:
        model: a HuggingFace causal LM.
        input_ids: ``(nsamples, seqlen)`` token ids.
        batch_size: windows per forward pass.
        device: where to compute (default: where the model is).
        storage_device: where hidden states are kept between blocks (default: CPU).

    Returns:
        ``(blocks name, blocks, inputs of block 0)``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(
            "calibration must be a (nsamples, seqlen) LongTensor of token ids "
            f"(see spp_peft.data.calibration_windows), got "
            f"{type(input_ids).__name__}{tuple(getattr(input_ids, 'shape', ()))}"
        )
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"calibration is empty: shape {tuple(input_ids.shape)}")
    blocks_name, blocks = find_decoder_blocks(model)
    home = model_device(model)
    device = torch.device(device) if device is not None else home
    storage_device = torch.device(storage_device) if storage_device is not None else torch.device("cpu")
    _move_outside(model, blocks_name, device)

    inputs = BlockInputs()

    def record(module, args, kwargs):
        args = list(args)
        if args:
            hidden = args.pop(0)
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden = kwargs.pop("hidden_states")
        else:
            raise RuntimeError(f"{type(module).__name__} was called without hidden states")
        inputs.hidden.append(hidden.detach().to(storage_device))
        inputs.args.append(tuple(args))
        inputs.kwargs.append(dict(kwargs))
        raise _InputsCaptured

    handle = blocks[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _InputsCaptured:
                continue
            raise RuntimeError(
                f"{type(model).__name__}: the forward pass never reached the first decoder block "
                f"'{blocks_name}.0'; this architecture is not supported"
            )
    finally:
        handle.remove()
        _move_outside(model, blocks_name, home)
    return blocks_name, blocks, inputs


@torch.no_grad()
def forward_block(block: nn.Module, inputs: BlockInputs, device: torch.device) -> list[torch.Tensor]:
    """Run ``block`` on every batch of ``inputs``; outputs are returned on each batch's storage device."""
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        out = _block_output(block(hidden.to(device), *args, **kwargs))
        outputs.append(out.to(hidden.device))
    return outputs


BlockCallback = Callable[[int, str, nn.Module, BlockInputs], None]


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    process_block: BlockCallback,
    device: Optional[torch.device] = None,
    batch_size: int = 8,
    show_progress: bool = True,
    desc: str = "pruning",
) -> None:
    """Capture block-0 inputs, then for each block call ``process_block`` and propagate its outputs.

    ``process_block(index, block_name, block, inputs)`` runs with the block on the compute device; it may
    run the block on ``inputs`` (e.g. with statistics hooks, see :func:`collect_inputs`) and change its
    weights. The block's outputs are recomputed afterwards, so block ``i + 1`` is calibrated on the
    activations of the already-pruned blocks ``0..i``, as in the SparseGPT and Wanda references.
    """
    was_training = model.training
    model.eval()  # dropout off: the statistics must be those of inference
    try:
        blocks_name, blocks, inputs = capture_block_inputs(model, input_ids, batch_size, device)
        home = model_device(model)
        device = torch.device(device) if device is not None else home
        for index in progress(range(len(blocks)), show_progress, desc=desc, unit="block"):
            block = blocks[index]
            block_home = model_device(block)
            block.to(device)
            try:
                process_block(index, f"{blocks_name}.{index}", block, inputs)
                inputs.hidden = forward_block(block, inputs, device)
            finally:
                block.to(block_home)
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_inputs(
    block: nn.Module,
    inputs: BlockInputs,
    layers: dict[str, nn.Module],
    make_stats: Callable[[nn.Module], Any],
    device: torch.device,
) -> dict[str, Any]:
    """Run ``block`` over ``inputs`` and feed every input of each layer in ``layers`` to its statistics.

    Args:
        block: the decoder block (on ``device``).
        inputs: the block's inputs.
        layers: ``{name: linear-like layer inside block}``.
        make_stats: builds a statistics object (with ``add_batch(inputs)``) for a layer.

    Returns:
        ``{name: statistics}``.
    """
    stats = {name: make_stats(layer) for name, layer in layers.items()}
    handles = []
    for name, layer in layers.items():
        # Bind the statistics object now; a closure over the loop variable would see only the last one.
        def hook(module, args, output, _stats=stats[name]):
            _stats.add_batch(args[0])

        handles.append(layer.register_forward_hook(hook))
    try:
        forward_block(block, inputs, device)
    finally:
        for handle in handles:
            handle.remove()
    return stats
