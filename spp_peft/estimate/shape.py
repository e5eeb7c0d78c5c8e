"""The shape of a decoder, read from its config alone: parameter counts, widths, and the linear layers of
each block (the model is built on the ``meta`` device: no memory, no weights)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from spp_peft._utils import matches_target

__all__ = ["ModelShape", "SMOLLM2_135M_CONFIG", "load_config", "model_shape", "target_shapes"]

# SmolLM2-135M(-Instruct), the project's built-in model (config.json of HuggingFaceTB/SmolLM2-135M-Instruct):
# kept here so that estimating it needs neither the model file nor the network.
SMOLLM2_135M_CONFIG = dict(
    model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    hidden_act="silu", mlp_bias=False, attention_bias=False, rms_norm_eps=1e-5,
)
_BUILTIN = ("smollm2", "builtin", "smollm2-135m", "smollm2-135m-instruct")


@dataclass
class ModelShape:
    """What the estimate needs to know about a decoder, read from its config (no weights are loaded).

    ``block_linears`` lists, per decoder block, ``{relative name: (out_features, in_features)}``;
    ``blocks_name`` is the qualified name of the block list (``"model.layers"``), so that target patterns
    are matched against the module names PEFT sees.
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
    blocks_name: str = ""

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
    if os.path.isfile(text):
        if not text.endswith(".json"):
            raise ValueError(f"--model {text!r} is a file; pass a model folder or its config.json")
        return _config_from_file(AutoConfig, text), text
    if os.path.isdir(text):
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

    from spp_peft.models import find_decoder_blocks

    config, name = load_config(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in net.parameters())  # parameters() yields tied parameters once
    blocks_name, blocks = find_decoder_blocks(net)
    block_linears = [_linear_shapes(block) for block in blocks]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd"))
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head"))
    head_dim = int(getattr(text, "head_dim", None) or h // heads)
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    inter = int(getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * h)
    return ModelShape(
        name=str(name), model_type=str(getattr(config, "model_type", "?")), total_params=total,
        block_params=[sum(p.numel() for p in block.parameters()) for block in blocks], hidden_size=h,
        intermediate_size=inter, q_width=heads * head_dim, kv_width=kv_heads * head_dim, num_heads=heads,
        vocab_size=int(getattr(text, "vocab_size")), gated_mlp=_is_gated(block_linears, inter),
        block_linears=block_linears, blocks_name=blocks_name,
    )


def _linear_shapes(block: nn.Module) -> dict[str, tuple[int, int]]:
    """``{relative name: (out_features, in_features)}`` of the linear layers of one block."""
    from spp_peft.models import find_linears
    from spp_peft.sparsity import in_out_features

    shapes = {}
    for name, linear in find_linears(block, exclude=()).items():
        in_features, out_features = in_out_features(linear)
        shapes[name] = (int(out_features), int(in_features))
    return shapes


def _is_gated(block_linears: list[dict[str, tuple[int, int]]], intermediate: int) -> bool:
    """A gated MLP has two ``intermediate``-wide projections (gate, up) or one fused ``2 * intermediate``."""
    widths = [out for out, _ in block_linears[0].values()] if block_linears else []
    return sum(1 for w in widths if w == intermediate) >= 2 or any(w == 2 * intermediate for w in widths)


def target_shapes(shape: ModelShape, target_modules: Optional[Union[Sequence[str], str]]
                  ) -> list[list[tuple[int, int]]]:
    """Per block, the ``(out, in)`` shapes of the linears ``target_modules`` selects, with PEFT's semantics
    (:func:`spp_peft._utils.matches_target` on the full module names); ``None``: the architecture's SPP
    defaults (every block linear when it has none); ``"all"`` / ``"all-linear"``: every block linear."""
    from spp_peft.tuner.config import SPP_TARGET_MODULES_MAPPING

    if target_modules is None:
        target_modules = SPP_TARGET_MODULES_MAPPING.get(shape.model_type)
    if isinstance(target_modules, str) and target_modules in ("all", "all-linear"):
        target_modules = None
    prefix = f"{shape.blocks_name}." if shape.blocks_name else ""
    found = [[size for name, size in block.items() if matches_target(f"{prefix}{index}.{name}", target_modules)]
             for index, block in enumerate(shape.block_linears)]
    if not any(found):
        example = next((f"{prefix}{index}.{name}" for index, block in enumerate(shape.block_linears)
                        for name in block), "none")
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of the decoder blocks "
                         f"(a list names modules or their dotted suffixes, a string is a regex over whole names "
                         f"such as {example!r})")
    return found
