"""Memory planning: how much memory one device needs to fine-tune a model with SPP, LoRA or in full.

Use it to pick a topology (number of devices, FSDP / ZeRO-3, gradient checkpointing, micro-batch) before
renting GPUs::

    from spp_peft.estimate import estimate_memory, format_estimate
    rows = [estimate_memory("smollm2", method=m, batch_size=8, seq_len=1024, dtype="bfloat16")
            for m in ("spp", "lora", "full")]
    print(format_estimate(rows))

or ``spp-peft estimate --model smollm2 --batch-size 8 --seq-len 1024`` (the CLI calls
:func:`add_estimate_arguments` and :func:`run_estimate`), or ``python -m spp_peft.estimate ...``.

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
  transformers' Llama with SDPA attention (``tests/test_estimate.py`` re-checks the count): per block and
  token ``b * (2h + 2q + 2kv + 4i) + 8h`` bytes (norm outputs, rotated queries, attention output, keys,
  values, the gated MLP's four ``i``-wide tensors, and the two RMSNorm inputs upcast to fp32), plus ``2bh``
  for full fine-tuning (trainable norm weights save the normalised input) and ``r * b`` per LoRA target.
  Non-gated MLPs count ``2i``. ``attention="eager"`` adds ``2 * heads * seq_len * b`` per token (the
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
* **runtime overhead**: ``overhead_gib`` (default 0): the CUDA context, cuBLAS workspaces and the
  allocator's fragmentation; budget 1-2 GiB per GPU.

Validation: ``tests/test_estimate.py::test_estimate_matches_measured_peak_rss`` (``slow``) trains
SmolLM2-135M on CPU in a fresh process and compares the estimate with the measured peak RSS of the
training steps (minus the RSS of the process before the model was loaded); see ``docs/scaling.md`` for
the recorded figures. Not modelled: communication buffers of NCCL / gloo, the KV cache (training has
none), allocator caching beyond ``overhead_gib``, optimizer states other than AdamW / SGD.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

import torch

__all__ = [
    "ModelShape",
    "MemoryEstimate",
    "model_shape",
    "estimate_memory",
    "format_estimate",
    "add_estimate_arguments",
    "run_estimate",
    "METHODS",
    "SHARDINGS",
]

METHODS = ("spp", "lora", "full")
SHARDINGS = ("none", "fsdp", "zero3")
OPTIMIZERS = ("adamw", "sgd")
ATTENTIONS = ("sdpa", "eager")
GIB = 1024**3

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

# SmolLM2-135M(-Instruct), the project's built-in model (config.json of HuggingFaceTB/SmolLM2-135M-Instruct):
# kept here so that estimating it needs neither the model file nor the network.
SMOLLM2_135M_CONFIG = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    hidden_act="silu", mlp_bias=False, attention_bias=False, rms_norm_eps=1e-5,
)
_BUILTIN = ("smollm2", "builtin", "smollm2-135m", "smollm2-135m-instruct")


def _dtype(value: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {value!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------ the model


@dataclass
class ModelShape:
    """What the estimate needs to know about a decoder, read from its config (no weights are loaded).

    ``block_linears`` lists, per decoder block, ``{relative name: (out_features, in_features)}``.
    """

    name: str
    model_type: str
    total_params: int
    block_params: list[int]
    hidden_size: int
    intermediate_size: int
    q_width: int
    kv_width: int
    num_heads: int
    vocab_size: int
    gated_mlp: bool
    block_linears: list[dict[str, tuple[int, int]]] = field(repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.block_params)

    @property
    def non_block_params(self) -> int:
        return self.total_params - sum(self.block_params)


def load_config(model: Any):
    """``(transformers config, display name)`` of anything :func:`model_shape` accepts."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model, getattr(model, "_name_or_path", "") or model.model_type
    if isinstance(model, dict):
        data = dict(model)
        model_type = data.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **data), model_type
    text = str(model)
    if text.lower() in _BUILTIN:
        data = dict(SMOLLM2_135M_CONFIG)
        data.pop("model_type")
        return LlamaConfig(**data), "smollm2-135m"
    if os.path.isdir(text) or os.path.isfile(text):
        if os.path.isfile(text) and not text.endswith(".json"):
            raise ValueError(f"--model {text!r} is a file; pass a model folder or its config.json")
        if os.path.isfile(text):
            return _config_from_file(AutoConfig, text), text
        return AutoConfig.from_pretrained(text), text
    try:
        return AutoConfig.from_pretrained(text), text
    except OSError as err:
        raise ValueError(
            f"cannot read a model config from {text!r}: not 'smollm2', not a local folder with config.json, and "
            f"not reachable on the hub (offline?). Cause: {err}"
        ) from None


def _config_from_file(auto_config, path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {path!r} is not a readable JSON config: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"--model {path!r} is not a transformers config.json (no model_type)")
    return auto_config.for_model(data.pop("model_type"), **data)


def model_shape(model: Any = "smollm2") -> ModelShape:
    """Read the shape of a decoder from ``"smollm2"`` (built in), a local folder or ``config.json`` path, a
    hub id (needs network), a transformers config, or a dict of config fields.

    The model is instantiated on the ``meta`` device (no memory, no weights) to count parameters exactly
    and to find the decoder blocks and their linear layers with :mod:`spp_peft.models`.
    """
    if isinstance(model, str) and model.lower() in _BUILTIN:
        return _builtin_shape()
    return _model_shape(model)


@functools.lru_cache(maxsize=1)
def _builtin_shape() -> ModelShape:
    return _model_shape("smollm2")


def _model_shape(model: Any) -> ModelShape:
    from transformers import AutoModelForCausalLM

    from .models import find_decoder_blocks, find_linears

    config, name = load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    seen: set[int] = set()
    total = 0
    for p in net.parameters():  # tied parameters once
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    _, blocks = find_decoder_blocks(net)
    block_params = [sum(p.numel() for p in block.parameters()) for block in blocks]
    block_linears = []
    for block in blocks:
        linears = {}
        for lname, lin in find_linears(block, exclude=()).items():
            w = lin.weight
            # transformers' Conv1D stores (in, out)
            out_f, in_f = (w.shape[0], w.shape[1]) if isinstance(lin, torch.nn.Linear) else (w.shape[1], w.shape[0])
            linears[lname] = (int(out_f), int(in_f))
        block_linears.append(linears)

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head"))
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h
    vocab = int(getattr(text, "vocab_size"))
    widths = [out for out, _ in block_linears[0].values()] if block_linears else []
    gated = sum(1 for w in widths if w == inter) >= 2 or any(w == 2 * inter for w in widths)
    return ModelShape(
        name=str(name), model_type=str(getattr(config, "model_type", "?")), total_params=total,
        block_params=block_params, hidden_size=h, intermediate_size=int(inter), q_width=heads * head_dim,
        kv_width=kv_heads * head_dim, num_heads=heads, vocab_size=vocab, gated_mlp=gated,
        block_linears=block_linears,
    )


def _targets(shape: ModelShape, target_modules) -> list[list[tuple[int, int]]]:
    """Per block, the (out, in) shapes of the target linears (PEFT's suffix rule, or a regex)."""
    from .tuner.config import SPP_TARGET_MODULES_MAPPING

    if target_modules is None:
        target_modules = SPP_TARGET_MODULES_MAPPING.get(shape.model_type)  # None: every block linear
    if isinstance(target_modules, str) and target_modules in ("all", "all-linear"):
        target_modules = None
    if isinstance(target_modules, str):
        import re

        pattern = re.compile(target_modules)
        keep = lambda n: pattern.fullmatch(n) is not None or pattern.search(n) is not None  # noqa: E731
    elif target_modules is None:
        keep = lambda n: True  # noqa: E731
    else:
        keys = list(target_modules)
        keep = lambda n: any(n == k or n.endswith("." + k) for k in keys)  # noqa: E731
    found = [[s for n, s in block.items() if keep(n)] for block in shape.block_linears]
    if not any(found):
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of the decoder blocks")
    return found


# ------------------------------------------------------------------------------------------ estimate


@dataclass
class MemoryEstimate:
    """Per-device peak memory of one training step, in bytes (see the module docstring for the model).

    ``components`` maps a readable name to the bytes alive at the peak; ``total`` is their sum. The peak is
    the larger of two moments, both broken down in ``phase_components``: the start of backward (every saved
    activation and the loss gradients alive) and the optimizer step (every gradient alive); ``peak_phase``
    names it. ``settings`` records the inputs.
    """

    method: str
    settings: dict
    total_params: int
    trainable_params: int
    components: dict[str, int]
    peak_phase: str = "start of backward"
    phase_components: dict[str, dict[str, int]] = field(default_factory=dict)

    def phase_total(self, phase: str) -> int:
        return int(sum(self.phase_components[phase].values()))

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total"] = self.total
        return data


def estimate_memory(
    model: Any = "smollm2",
    *,
    method: str = "spp",
    batch_size: int = 1,
    seq_len: int = 2048,
    dtype: Union[str, torch.dtype] = "bfloat16",
    compute_dtype: Union[str, torch.dtype, None] = None,
    r: int = 16,
    target_modules: Optional[Union[Sequence[str], str]] = None,
    gradient_checkpointing: bool = False,
    devices: int = 1,
    sharding: str = "none",
    optimizer: str = "adamw",
    attention: str = "sdpa",
    chunk_rows: Optional[int] = None,
    grad_accumulation_steps: int = 1,
    overhead_gib: float = 0.0,
) -> MemoryEstimate:
    """Estimate the peak memory per device of one training step.

    Args:
        model: ``"smollm2"``, a local model folder / ``config.json``, a hub id, a transformers config or a
            dict of config fields (or a :class:`ModelShape` from :func:`model_shape`, to reuse it).
        method: ``"spp"``, ``"lora"`` or ``"full"`` (full fine-tuning).
        batch_size: per-device micro-batch (sequences).
        seq_len: tokens per sequence.
        dtype: dtype the base weights are stored in.
        compute_dtype: dtype of the forward/backward (autocast); default ``dtype``.
        r: SPP row groups / LoRA rank.
        target_modules: adapted linears (PEFT's suffix rule or a regex); default: the architecture's SPP
            defaults (every attention and MLP projection for Llama-like models).
        gradient_checkpointing: keep only each block's input, recompute in backward.
        devices: data-parallel devices (GPUs) in total.
        sharding: ``"none"`` (one device, or DDP), ``"fsdp"`` (FSDP FULL_SHARD / FSDP2) or ``"zero3"``.
        optimizer: ``"adamw"`` (two fp32 states per trainable parameter) or ``"sgd"`` (none).
        attention: ``"sdpa"`` (flash / memory-efficient kernels: no ``seq_len^2`` term) or ``"eager"``.
        chunk_rows: SPP kernel row chunking (bounds its temporaries), as ``SPPConfig.chunk_rows``.
        grad_accumulation_steps: with more than one, all gradients stay alive through the next
            micro-batch's forward and backward.
        overhead_gib: fixed runtime overhead to add (CUDA context, workspaces, fragmentation).

    Returns:
        A :class:`MemoryEstimate`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
    for label, value in (("batch_size", batch_size), ("seq_len", seq_len), ("devices", devices), ("r", r),
                         ("grad_accumulation_steps", grad_accumulation_steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    if not (0 <= overhead_gib < float("inf")):  # also refuses NaN
        raise ValueError(f"overhead_gib must be a finite number >= 0, got {overhead_gib!r}")
    if sharding != "none" and devices < 2:
        raise ValueError(f"sharding={sharding!r} needs devices >= 2")

    shape = model if isinstance(model, ModelShape) else model_shape(model)
    w_dtype = _dtype(dtype)
    c_dtype = _dtype(compute_dtype) if compute_dtype is not None else w_dtype
    wb, b = _nbytes(w_dtype), _nbytes(c_dtype)
    tokens = batch_size * seq_len
    h, q, kv, i, V = shape.hidden_size, shape.q_width, shape.kv_width, shape.intermediate_size, shape.vocab_size
    targets = _targets(shape, target_modules) if method != "full" else None
    n_targets = sum(len(t) for t in targets) if targets else 0
    for block in targets or []:
        for out_f, _ in block:
            if method == "spp" and r > out_f:
                raise ValueError(f"SPP needs r <= out_features; r={r} > {out_f} for a target of {shape.name}")

    # --- trainable parameters
    if method == "spp":
        trainable = sum(r * in_f + out_f for block in targets for out_f, in_f in block)
    elif method == "lora":
        trainable = sum(r * (in_f + out_f) for block in targets for out_f, in_f in block)
    else:
        trainable = shape.total_params
    shard = devices if sharding != "none" else 1

    # --- static: alive for the whole step
    static: dict[str, int] = {"weights": shape.total_params * wb // shard}
    if method == "full":
        # The trainable parameters are the weights; a fp32 master copy when they are stored in 16 bits.
        if wb < 4:
            static["fp32 master weights"] = shape.total_params * 4 // shard
        grad_all = shape.total_params * wb
        # Backward reaches the head / embeddings (outside the blocks) first: their gradients exist at its start.
        grad_first = shape.non_block_params * wb
    else:
        static["trainable parameters"] = trainable * 4 // shard  # adapters are fp32 (PEFT's default)
        grad_all, grad_first = trainable * 4, 0
    if devices > 1 and sharding == "none":
        static["DDP gradient buckets"] = grad_all  # allocated when DDP wraps the model, kept
    static["optimizer states"] = (8 if optimizer == "adamw" else 0) * trainable // shard
    if sharding != "none":
        # Gathered working set: two blocks (current + prefetched) and the non-block parameters (FSDP2's root
        # unit, ZeRO-3's persisted embeddings and head), in the compute dtype; one block of full gradients.
        biggest = max(shape.block_params)
        static["gathered parameters"] = (2 * biggest + shape.non_block_params) * b + (
            biggest * wb if method == "full" else 0)
    if overhead_gib:
        static["runtime overhead"] = int(overhead_gib * GIB)

    # --- activations saved for backward (see the module docstring for the count)
    per_block = b * (2 * h + 2 * q + 2 * kv) + 8 * h + b * (4 * i if shape.gated_mlp else 2 * i)
    if method == "full":
        per_block += 2 * b * h  # the trainable norm weights save their (cast) normalised inputs
    if method == "lora":
        per_block += r * b * (n_targets // max(shape.num_layers, 1))
    if attention == "eager":
        per_block += 2 * shape.num_heads * seq_len * b
    # The final norm's fp32 input; with full fine-tuning also its normalised input and the head's input (a
    # frozen head saves only its weight).
    final = 4 * h + (2 * b * h if method == "full" else 0)
    if gradient_checkpointing:
        activations = tokens * (shape.num_layers * b * h + per_block + final)
    else:
        activations = tokens * (shape.num_layers * per_block + final)
    backward: dict[str, int] = {"activations": activations, "loss (logits)": 12 * tokens * V}
    if method == "spp":
        backward["SPP kernel temporaries"] = b * max(
            (min(out_f, chunk_rows) if chunk_rows else out_f) * in_f for block in targets for out_f, in_f in block)
    if c_dtype != w_dtype:
        linear_params = sum(o * n for block in shape.block_linears for o, n in block.values())
        backward["autocast weight copies"] = linear_params * b
    accumulated = grad_accumulation_steps > 1
    backward["gradients"] = (grad_all if accumulated else grad_first) // shard

    # --- the optimizer step: every gradient, plus one fp32 temporary per trainable parameter (the
    # multi-tensor AdamW's sqrt of the second moment)
    step = {"gradients": grad_all // shard,
            "optimizer temporaries": (4 * trainable // shard) if optimizer == "adamw" else 0}

    by_phase = {"start of backward": {**static, **backward}, "optimizer step": {**static, **step}}
    by_phase = {name: {k: int(v) for k, v in parts.items()} for name, parts in by_phase.items()}
    peak_phase = max(by_phase, key=lambda name: sum(by_phase[name].values()))

    settings = dict(
        model=shape.name, batch_size=batch_size, seq_len=seq_len, dtype=str(w_dtype).replace("torch.", ""),
        compute_dtype=str(c_dtype).replace("torch.", ""), r=r if method != "full" else None,
        targets=n_targets if method != "full" else None, gradient_checkpointing=gradient_checkpointing,
        devices=devices, sharding=sharding, optimizer=optimizer, attention=attention, chunk_rows=chunk_rows,
        grad_accumulation_steps=grad_accumulation_steps,
    )
    return MemoryEstimate(method=method, settings=settings, total_params=shape.total_params,
                          trainable_params=trainable, components=dict(by_phase[peak_phase]),
                          peak_phase=peak_phase, phase_components=by_phase)


def _fmt_bytes(n: int) -> str:
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024**2:
        return f"{n / 1024**2:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n else "0"


_ORDER = ("weights", "fp32 master weights", "trainable parameters", "DDP gradient buckets", "optimizer states",
          "gathered parameters", "runtime overhead", "gradients", "activations", "loss (logits)",
          "SPP kernel temporaries", "autocast weight copies", "optimizer temporaries")


def format_estimate(estimates: Union[MemoryEstimate, Iterable[MemoryEstimate]]) -> str:
    """A plain-text table: one column per estimate, one row per memory component, then the total."""
    rows = [estimates] if isinstance(estimates, MemoryEstimate) else list(estimates)
    if not rows:
        return ""
    s = rows[0].settings
    head = (
        f"Per-device memory estimate: {s['model']}, batch {s['batch_size']} x seq {s['seq_len']}, "
        f"weights {s['dtype']}, compute {s['compute_dtype']}, {s['devices']} device(s), sharding {s['sharding']}, "
        f"gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, optimizer {s['optimizer']}"
    )
    names = [n for n in _ORDER if any(n in e.components for e in rows)]
    for e in rows:
        names += [k for k in e.components if k not in names]
    labels = [e.method.upper() if e.method != "full" else "full FT" for e in rows]
    width = max(len(n) for n in names + ["trainable params", "total (peak)"])
    col = max(12, *(len(x) for x in labels))
    lines = [head, "", f"{'':<{width}}  " + "  ".join(f"{x:>{col}}" for x in labels)]
    lines.append(f"{'trainable params':<{width}}  " + "  ".join(f"{e.trainable_params:>{col},}" for e in rows))
    for n in names:
        lines.append(f"{n:<{width}}  " + "  ".join(f"{_fmt_bytes(e.components.get(n, 0)):>{col}}" for e in rows))
    lines.append(f"{'total (peak)':<{width}}  " + "  ".join(f"{_fmt_bytes(e.total):>{col}}" for e in rows))
    lines.append(f"{'peak at':<{width}}  " + "  ".join(
        f"{('backward' if e.peak_phase == 'start of backward' else 'optim step'):>{col}}" for e in rows))
    lines.append("")
    lines.append("Add the runtime's own overhead (CUDA context, workspaces, fragmentation: ~1-2 GiB per GPU) "
                 "unless --overhead-gib includes it. Model and validation: docs/scaling.md.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI


def add_estimate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``estimate`` options to ``parser`` (used by ``spp-peft estimate`` and ``python -m``)."""
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (built in), a local model folder or config.json, or a hub id (needs network)")
    parser.add_argument("--method", default="all", choices=("all",) + METHODS,
                        help="SPP, LoRA, full fine-tuning, or all three side by side (default)")
    parser.add_argument("--batch-size", type=int, default=1, help="per-device micro-batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of the stored weights (float32/bfloat16/float16)")
    parser.add_argument("--compute-dtype", default=None, help="autocast dtype if different from --dtype")
    parser.add_argument("--r", type=int, default=16, help="SPP row groups / LoRA rank")
    parser.add_argument("--target-modules", default=None,
                        help="comma-separated module names, or 'all-linear' (default: the architecture's SPP targets)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--devices", type=int, default=1, help="data-parallel devices in total (all nodes)")
    parser.add_argument("--sharding", default="none", choices=SHARDINGS,
                        help="none (single device or DDP), fsdp (FULL_SHARD / FSDP2) or zero3 (DeepSpeed)")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--attention", default="sdpa", choices=ATTENTIONS)
    parser.add_argument("--chunk-rows", type=int, default=None, help="SPP kernel row chunking (SPPConfig.chunk_rows)")
    parser.add_argument("--grad-accumulation-steps", type=int, default=1)
    parser.add_argument("--overhead-gib", type=float, default=0.0, help="fixed per-device runtime overhead to add")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_estimate(args: argparse.Namespace) -> int:
    """Run the ``estimate`` command from parsed arguments; prints the result, returns the exit status."""
    import sys

    methods = METHODS if args.method == "all" else (args.method,)
    targets = args.target_modules
    if targets and targets not in ("all-linear", "all"):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    try:
        shape = model_shape(args.model)
        rows = [
            estimate_memory(
                shape, method=m, batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype,
                compute_dtype=args.compute_dtype, r=args.r, target_modules=targets,
                gradient_checkpointing=args.gradient_checkpointing, devices=args.devices, sharding=args.sharding,
                optimizer=args.optimizer, attention=args.attention, chunk_rows=args.chunk_rows,
                grad_accumulation_steps=args.grad_accumulation_steps, overhead_gib=args.overhead_gib,
            )
            for m in methods
        ]
    except ValueError as err:
        print(f"spp-peft estimate: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([e.to_dict() for e in rows], indent=1))
    else:
        print(format_estimate(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spp_peft.estimate",
                                     description="Per-device memory estimate for SPP, LoRA and full fine-tuning.")
    add_estimate_arguments(parser)
    return run_estimate(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
