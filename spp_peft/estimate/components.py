"""One function per memory component of a training step, and :func:`estimate_memory`, their sum at the peak.

What is counted, per device (all in bytes; ``T = batch_size * seq_len`` tokens of the per-device micro-batch,
``b`` the bytes of the compute dtype, ``h`` hidden size, ``q``/``kv`` the query and key/value widths, ``i``
the MLP width, ``V`` the vocabulary, ``L`` the decoder blocks):

* **weights**: every parameter of the base model in ``dtype`` (tied embeddings once). Under FSDP / ZeRO-3
  sharded ``1/N``, plus the gathered working set: two decoder blocks (current + prefetched) and the
  parameters outside the blocks (embeddings, head, final norm: FSDP2's root unit stays gathered).
* **trainable parameters**: SPP ``r * in + out`` per target linear, LoRA ``r * (in + out)``, full
  fine-tuning all parameters. Adapters are fp32 (PEFT's default); in full fine-tuning with a 16-bit
  ``dtype`` a fp32 master copy is counted (the mixed-precision convention of DeepSpeed and FSDP).
* **gradients** of the trainable parameters (their dtype), plus DDP's gradient buckets (one more copy,
  allocated when DDP wraps the model) on several devices without sharding.
* **optimizer states**: AdamW keeps two fp32 states per trainable parameter (8 bytes); ``sgd`` none.
* **activations** saved for backward, as measured with ``torch.autograd.graph.saved_tensors_hooks`` on
  transformers' Llama with SDPA attention (``tests/estimate/test_estimate.py`` re-checks the count): per
  block and token ``b * (2h + 2q + 2kv + 4i) + 8h`` bytes (norm outputs, rotated queries, attention output,
  keys, values, the gated MLP's four ``i``-wide tensors, and the two RMSNorm inputs upcast to fp32), plus
  ``2bh`` for full fine-tuning (trainable norm weights save the normalised input) and ``r * b`` per LoRA
  target. Non-gated MLPs count ``2i``. ``attention="eager"`` adds ``2 * heads * seq_len * b`` per token (the
  attention matrix). With gradient checkpointing only each block's input ``b * h`` is kept, plus one
  block's full set while it is recomputed.
* **loss**: ``12 * T * V`` bytes at the start of backward (the fp32 log-softmax output saved by the cross
  entropy, its incoming gradient and the gradient of the logits) - often the largest activation term
  for small models with large vocabularies.
* **kernel temporaries**: SPP builds one weight-sized ``W * (1 + D)`` (or ``G * W`` in backward) for one
  layer at a time: the largest target weight in the compute dtype (``chunk_rows`` rows of it when set).
  When the compute dtype differs from ``dtype`` (autocast over fp32 weights), every block linear's weight
  is cast and the cast copy is saved for backward: counted as ``autocast weight copies``.
* **the peak** is the larger of two moments: the *start of backward* (all saved activations, the loss
  gradients, and the gradients backward produces first: those of the head / embeddings in full
  fine-tuning, or every gradient with ``grad_accumulation_steps > 1``) and the *optimizer step* (every
  gradient, plus one fp32 temporary per trainable parameter for the multi-tensor AdamW).
* **quantized bases** (``quantization``, QLoRA-style, bitsandbytes as transformers applies it: every decoder
  block linear, not the embeddings or the head): 4-bit weights take 0.5 byte per parameter plus one fp32
  absmax per 64 weights (double quant: one byte per 64 and one fp32 per 256 of those); 8-bit take 1 byte plus
  one fp32 scale per output row. Every forward and backward dequantizes one layer at a time into the
  compute dtype (**dequantized weight**: the largest block linear); SPP's ``W * (1 + D)`` comes on top.
  No autocast weight copies: the matmuls run in the compute dtype directly.
* **runtime overhead**: ``overhead_gib`` (default 0): the CUDA context, cuBLAS workspaces and the
  allocator's fragmentation; budget 1-2 GiB per GPU.

Each component function takes the :class:`Plan` of one estimate and returns its bytes, or ``None`` where
the component does not exist for these settings (it then has no row in the result).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

import torch

from .result import GIB, MemoryEstimate
from .settings import EstimateSettings
from .shape import ModelShape, model_shape, target_shapes

__all__ = ["Plan", "make_plan", "estimate_memory", "STATIC", "START_OF_BACKWARD", "OPTIMIZER_STEP"]


@dataclass(frozen=True)
class Plan:
    """What every component reads: the settings, the model's shape, and what follows from both."""

    settings: EstimateSettings
    shape: ModelShape
    targets: list[list[tuple[int, int]]]  # per block, (out, in) of each adapted linear; empty in full FT
    trainable: int  # trainable parameters
    weight_bytes: int  # bytes per element of the stored weights
    compute_bytes: int  # bytes per element of the forward / backward

    @property
    def full(self) -> bool:
        return self.settings.method == "full"

    @property
    def n_targets(self) -> int:
        return sum(len(block) for block in self.targets)


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def trainable_params(method: str, r: int, shape: ModelShape, targets: list[list[tuple[int, int]]]) -> int:
    """SPP: ``r * in + out`` per target (row-group scales and a per-row vector); LoRA: ``r * (in + out)``."""
    if method == "spp":
        return sum(r * in_f + out_f for block in targets for out_f, in_f in block)
    if method == "lora":
        return sum(r * (in_f + out_f) for block in targets for out_f, in_f in block)
    return shape.total_params


def make_plan(settings: EstimateSettings) -> Plan:
    """Read the model's shape (unless ``settings.model`` is one) and select the targets.

    Raises:
        ValueError: the model cannot be read, no linear matches the targets, or ``r`` exceeds a target's
            output features under SPP.
    """
    shape = settings.model if isinstance(settings.model, ModelShape) else model_shape(settings.model)
    targets = target_shapes(shape, settings.target_modules) if settings.method != "full" else []
    if settings.method == "spp":
        for block in targets:
            for out_f, _ in block:
                if settings.r > out_f:
                    raise ValueError(f"SPP needs r <= out_features; r={settings.r} > {out_f} for a target of "
                                     f"{shape.name}")
    return Plan(settings=settings, shape=shape, targets=targets,
                trainable=trainable_params(settings.method, settings.r, shape, targets),
                weight_bytes=_nbytes(settings.dtype), compute_bytes=_nbytes(settings.compute_torch_dtype))


# ------------------------------------------------------------------------ alive for the whole step


def _block_linear_params(plan: Plan) -> int:
    return sum(o * n for block in plan.shape.block_linears for o, n in block.values())


def quantized_linear_bytes(out_f: int, in_f: int, quantization: str, double_quant: bool = False) -> float:
    """Bytes of one bitsandbytes-quantized ``(out, in)`` weight with its scales."""
    n = out_f * in_f
    if quantization == "8bit":
        return n + 4 * out_f  # int8 codes + a fp32 scale per row
    # absmax per block of 64; double quant: int8 absmax, a fp32 one per 256 of them, the 256-entry fp32 code
    # table and the offset of each layer
    scales = n / 64 + 4 * n / (64 * 256) + 1028 if double_quant else 4 * n / 64
    return n / 2 + scales


def weights(plan: Plan) -> int:
    s = plan.settings
    if s.quantization == "none":
        return plan.shape.total_params * plan.weight_bytes // s.shards
    quantized = sum(quantized_linear_bytes(o, n, s.quantization, s.double_quant)
                    for block in plan.shape.block_linears for o, n in block.values())
    return int(quantized) + (plan.shape.total_params - _block_linear_params(plan)) * plan.weight_bytes


def fp32_master_weights(plan: Plan) -> Optional[int]:
    """Full fine-tuning of 16-bit weights keeps a fp32 master copy (mixed precision)."""
    if not plan.full or plan.weight_bytes >= 4:
        return None
    return plan.shape.total_params * 4 // plan.settings.shards


def adapter_parameters(plan: Plan) -> Optional[int]:
    """The adapters, fp32 (PEFT's default); in full fine-tuning they are the weights, counted there."""
    return None if plan.full else plan.trainable * 4 // plan.settings.shards


def all_gradients(plan: Plan) -> int:
    """Every gradient of one step, unsharded: in the weights' dtype for full fine-tuning, else fp32."""
    return plan.shape.total_params * plan.weight_bytes if plan.full else plan.trainable * 4


def ddp_gradient_buckets(plan: Plan) -> Optional[int]:
    """DDP allocates one more copy of the gradients when it wraps the model, and keeps it."""
    s = plan.settings
    return all_gradients(plan) if s.devices > 1 and s.sharding == "none" else None


def optimizer_states(plan: Plan) -> int:
    per_param = 8 if plan.settings.optimizer == "adamw" else 0  # AdamW: two fp32 moments
    return per_param * plan.trainable // plan.settings.shards


def gathered_parameters(plan: Plan) -> Optional[int]:
    """Sharded training gathers two blocks (current + prefetched) and the non-block parameters (FSDP2's root
    unit, ZeRO-3's persisted embeddings and head) in the compute dtype; full fine-tuning adds one block of
    full gradients."""
    if plan.settings.sharding == "none":
        return None
    biggest = max(plan.shape.block_params)
    gathered = (2 * biggest + plan.shape.non_block_params) * plan.compute_bytes
    return gathered + (biggest * plan.weight_bytes if plan.full else 0)


def runtime_overhead(plan: Plan) -> Optional[int]:
    return int(plan.settings.overhead_gib * GIB) if plan.settings.overhead_gib else None


# ------------------------------------------------------------------------ at the start of backward


def activations_per_block_token(plan: Plan) -> int:
    """Bytes one block saves for backward per token (the count is in the module docstring)."""
    s, shape, b = plan.settings, plan.shape, plan.compute_bytes
    h, i = shape.hidden_size, shape.intermediate_size
    per_block = b * (2 * h + 2 * shape.q_width + 2 * shape.kv_width) + 8 * h + b * (4 * i if shape.gated_mlp else 2 * i)
    if plan.full:
        per_block += 2 * b * h  # the trainable norm weights save their (cast) normalised inputs
    if s.method == "lora":
        per_block += s.r * b * (plan.n_targets // max(shape.num_layers, 1))
    if s.attention == "eager":
        per_block += 2 * shape.num_heads * s.seq_len * b
    return per_block


def activations(plan: Plan) -> int:
    """Every block's saved tensors (with checkpointing: each block's input, plus one block recomputed), and
    the final norm's fp32 input; full fine-tuning also saves the normalised input of the head (a frozen head
    saves only its weight)."""
    b, h, layers = plan.compute_bytes, plan.shape.hidden_size, plan.shape.num_layers
    per_block = activations_per_block_token(plan)
    final = 4 * h + (2 * b * h if plan.full else 0)
    if plan.settings.gradient_checkpointing:
        return plan.settings.tokens * (layers * b * h + per_block + final)
    return plan.settings.tokens * (layers * per_block + final)


def loss_logits(plan: Plan) -> int:
    """The cross entropy's fp32 log-softmax output, its incoming gradient and the logits' gradient."""
    return 12 * plan.settings.tokens * plan.shape.vocab_size


def kernel_temporaries(plan: Plan) -> Optional[int]:
    """SPP's one weight-sized ``W * (1 + D)`` (or ``G * W``) at a time: the largest target, chunked."""
    if plan.settings.method != "spp":
        return None
    chunk = plan.settings.chunk_rows
    return plan.compute_bytes * max(
        (min(out_f, chunk) if chunk else out_f) * in_f for block in plan.targets for out_f, in_f in block)


def dequantized_weight(plan: Plan) -> Optional[int]:
    """A quantized base is dequantized one layer at a time (forward and backward): the largest block linear."""
    if plan.settings.quantization == "none":
        return None
    return plan.compute_bytes * max(o * n for block in plan.shape.block_linears for o, n in block.values())


def autocast_weight_copies(plan: Plan) -> Optional[int]:
    """Autocast casts every block linear's weight to the compute dtype and saves the copy for backward."""
    s = plan.settings
    if s.compute_torch_dtype == s.dtype or s.quantization != "none":
        return None
    return _block_linear_params(plan) * plan.compute_bytes


def gradients_at_backward(plan: Plan) -> int:
    """Backward reaches the head / embeddings (outside the blocks) first, so in full fine-tuning their
    gradients exist at its start; with accumulation every gradient is alive from the last micro-batch."""
    if plan.settings.grad_accumulation_steps > 1:
        return all_gradients(plan) // plan.settings.shards
    first = plan.shape.non_block_params * plan.weight_bytes if plan.full else 0
    return first // plan.settings.shards


# ------------------------------------------------------------------------ at the optimizer step


def gradients_at_step(plan: Plan) -> int:
    return all_gradients(plan) // plan.settings.shards


def optimizer_temporaries(plan: Plan) -> int:
    """The multi-tensor AdamW's one fp32 temporary per trainable parameter (the second moment's sqrt)."""
    return 4 * plan.trainable // plan.settings.shards if plan.settings.optimizer == "adamw" else 0


Component = Callable[[Plan], Optional[int]]
STATIC: tuple[tuple[str, Component], ...] = (
    ("weights", weights), ("fp32 master weights", fp32_master_weights),
    ("trainable parameters", adapter_parameters), ("DDP gradient buckets", ddp_gradient_buckets),
    ("optimizer states", optimizer_states), ("gathered parameters", gathered_parameters),
    ("runtime overhead", runtime_overhead),
)
START_OF_BACKWARD: tuple[tuple[str, Component], ...] = (
    ("activations", activations), ("loss (logits)", loss_logits), ("SPP kernel temporaries", kernel_temporaries),
    ("dequantized weight", dequantized_weight),
    ("autocast weight copies", autocast_weight_copies), ("gradients", gradients_at_backward),
)
OPTIMIZER_STEP: tuple[tuple[str, Component], ...] = (
    ("gradients", gradients_at_step), ("optimizer temporaries", optimizer_temporaries),
)


def _measure(plan: Plan, components: tuple[tuple[str, Component], ...]) -> dict[str, int]:
    found = {name: component(plan) for name, component in components}
    return {name: int(size) for name, size in found.items() if size is not None}


def _record(plan: Plan) -> dict:
    """The inputs, JSON-ready, as :attr:`MemoryEstimate.settings` shows them."""
    s, adapted = plan.settings, not plan.full
    return dict(
        model=plan.shape.name, batch_size=s.batch_size, seq_len=s.seq_len, dtype=str(s.dtype).replace("torch.", ""),
        compute_dtype=str(s.compute_torch_dtype).replace("torch.", ""), r=s.r if adapted else None,
        targets=plan.n_targets if adapted else None, gradient_checkpointing=s.gradient_checkpointing,
        devices=s.devices, sharding=s.sharding, optimizer=s.optimizer, attention=s.attention,
        chunk_rows=s.chunk_rows, grad_accumulation_steps=s.grad_accumulation_steps,
        quantization=s.quantization, double_quant=s.double_quant if s.quantization == "4bit" else None,
    )


def estimate_memory(settings: Union[EstimateSettings, Any] = "smollm2", **fields: Any) -> MemoryEstimate:
    """Estimate the peak memory per device of one training step.

    Args:
        settings: an :class:`EstimateSettings` (``fields`` then replace some of its values), or the model
            (anything :func:`~spp_peft.estimate.shape.model_shape` reads, or a :class:`ModelShape` to reuse
            one) with the other :class:`EstimateSettings` fields as keywords:
            ``estimate_memory("smollm2", method="lora", batch_size=8)``.

    Raises:
        ValueError: invalid settings (the message names the field), an unreadable model, or targets that
            match nothing.
    """
    if isinstance(settings, EstimateSettings):
        settings = replace(settings, **fields)
    else:
        settings = EstimateSettings(**{"model": settings, **fields})
    plan = make_plan(settings)
    static = _measure(plan, STATIC)
    by_phase = {"start of backward": {**static, **_measure(plan, START_OF_BACKWARD)},
                "optimizer step": {**static, **_measure(plan, OPTIMIZER_STEP)}}
    peak_phase = max(by_phase, key=lambda name: sum(by_phase[name].values()))
    return MemoryEstimate(method=settings.method, settings=_record(plan), total_params=plan.shape.total_params,
                          trainable_params=plan.trainable, components=dict(by_phase[peak_phase]),
                          peak_phase=peak_phase, phase_components=by_phase)
