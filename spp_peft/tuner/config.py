"""Configuration of an SPP adapter (Lu et al., ICML 2024, arXiv:2405.16057)."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..sparsity import CHECK_MODES

# Default targets per architecture: every projection of attention and MLP, as the paper trains
# (q, k, v, o, gate, up, down for LLaMA). Architectures not listed fall back to "all-linear".
SPP_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    **{
        arch: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                     "olmo2", "granite", "smollm3", "cohere", "deepseek_v3")
    },
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


# s = alpha / r scales factors that start near 1; far beyond this the merged weights overflow fp16/bf16.
MAX_ALPHA = 1e6


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SPPConfig(PeftConfig):
    """Configuration of an [`SPPModel`]: sparsity-preserved PEFT.

    SPP (Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models",
    ICML 2024, arXiv:2405.16057) trains, for a frozen pruned weight ``W`` (out ``m`` x in ``n``), a matrix
    ``spp_A`` (``r x n``) and a vector ``spp_B`` (``m``) and uses ``W' = W * (1 + s * spp_B[j] * spp_A[g(j), k])``
    with ``s = spp_alpha / r`` and ``g(j)`` the contiguous row group of output ``j``. Every zero of ``W``
    stays zero through training, merging and export.

    Args:
        r: number of row groups (rows of ``spp_A``); the reference uses 16. When ``r`` does not divide
            ``out_features`` the groups are contiguous and differ in size by at most one row.
        spp_alpha: scaling numerator; ``s = spp_alpha / r`` (reference: 32 / 16 = 2).
        spp_dropout: dropout on the input of the adapter branch only (the base sees the clean input).
        target_modules: names (suffixes) or a regex of the modules to adapt; defaults per architecture to
            every attention and MLP projection, else "all-linear".
        exclude_modules: names or a regex of modules never to adapt.
        layers_to_transform / layers_pattern: restrict adaptation to some decoder layers, as in LoRA.
        fan_in_fan_out: the target stores its weight as ``(in, out)`` (GPT-2's ``Conv1D``); set automatically.
        bias: "none", "all" or "spp_only": which biases train (biases never break sparsity: they are not merged).
        modules_to_save: extra modules trained in full and saved with the adapter.
        init_weights: True (reference init: Kaiming-uniform ``spp_A``, zero ``spp_B``, so training starts
            exactly at the pruned model); False gives ``spp_B`` a random init too (testing only).
        sparsity_check: "strict" (default), "warn" or "off": what to do when a merge or unmerge changes a
            zero set (a filled zero is always an error unless "off").
        verify_base_masks: accepted for old ``adapter_config.json`` files and ignored there: whether a loaded
            adapter is checked against its base is the loading person's choice, never the file's
            (``spp_peft.load_adapter(model, path, verify_base_masks=False)``). Set on a config you build
            yourself, it applies to loads that use that config.
        base_masks: recorded at injection into a copy of this config (the config you pass stays reusable): per
            target module, the shape, sparsity, pattern and fingerprint of the base weight's zero mask. Saved in
            ``adapter_config.json``; a saved adapter must record every module it targets.
        base_pruning: recorded automatically from ``model.config.spp_pruning`` (how the base was pruned).
        rank_pattern / alpha_pattern: per-module ``r`` / ``spp_alpha``, as LoRA's: ``{"k_proj": 8}`` gives the
            modules whose name ends with ``k_proj`` (or matches the regex) ``r=8``; others use ``r`` /
            ``spp_alpha``. Useful when one ``r`` does not fit every target (GQA k/v projections are narrow).
        chunk_rows: let the SPP kernel process output rows in blocks of about this many rows, bounding its
            weight-sized temporaries (less memory, a little slower); ``None`` processes a layer at once.
    """

    r: int = field(default=16, metadata={"help": "Number of contiguous row groups, i.e. rows of spp_A (paper: 16)."})
    spp_alpha: float = field(default=32.0, metadata={"help": "Scaling numerator: s = spp_alpha / r (paper: s = 2)."})
    spp_dropout: float = field(
        default=0.0,
        metadata={"help": "Dropout on the adapter branch's input (the base sees the clean input); 0 = fast path."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffixes) or a regex to adapt. Default: every attention and MLP projection of "
            "known architectures (q,k,v,o,gate,up,down for LLaMA), else 'all-linear'."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names (suffixes) or a regex never to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indexes of the decoder layers to adapt (all when None)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform if not standard."}
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "True when the target stores weights as (in, out), like GPT-2's Conv1D (set automatically)."},
    )
    bias: Literal["none", "all", "spp_only"] = field(
        default="none", metadata={"help": "Which biases train: 'none', 'all' or 'spp_only'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter."}
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: Kaiming-uniform spp_A and zero spp_B (identity at start, as the paper). False: random "
            "spp_B too (for tests)."
        },
    )
    sparsity_check: Literal["strict", "warn", "off"] = field(
        default="strict",
        metadata={"help": "After merge/unmerge: 'strict' raises on any zero-set change, 'warn' warns on new zeros."},
    )
    base_masks: Optional[dict] = field(
        default=None,
        metadata={"help": "Recorded at injection: per target module, shape/sparsity/pattern/fingerprint of its mask."},
    )
    base_pruning: Optional[dict] = field(
        default=None, metadata={"help": "Recorded at injection from model.config.spp_pruning, if present."}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module r: {name or regex: r}, like LoRA's rank_pattern (others use r)."},
    )
    alpha_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module spp_alpha: {name or regex: alpha}, like LoRA's alpha_pattern."},
    )
    chunk_rows: Optional[int] = field(
        default=None,
        metadata={"help": "Kernel option: process output rows in blocks of ~this many rows to save memory."},
    )

    # Not a field: never saved, so an adapter file cannot switch its own check off (see the docstring).
    verify_base_masks: InitVar[Optional[bool]] = None

    def __post_init__(self, verify_base_masks: Optional[bool] = None):
        # A config read from a saved adapter carries its peft_type (PEFT writes it) or its mask records; one
        # built in code has neither. Only a config built in code may turn the mask check off.
        self.from_saved_adapter = self.peft_type is not None or self.base_masks is not None
        self.verify_base_masks = True if self.from_saved_adapter or verify_base_masks is None else bool(verify_base_masks)
        super().__post_init__()
        from ._registration import spp_peft_type

        self.peft_type = spp_peft_type()
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str (a regex).")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str (a regex).")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"SPPConfig.r must be a positive integer, got {self.r!r}")
        for name, alpha in [("spp_alpha", self.spp_alpha), *(
                (f"alpha_pattern[{k!r}]", v) for k, v in (self.alpha_pattern or {}).items())]:
            if not _is_number(alpha) or not math.isfinite(alpha) or abs(alpha) > MAX_ALPHA:
                raise ValueError(f"SPPConfig.{name} must be a finite number with |alpha| <= {MAX_ALPHA:g}, got {alpha!r}")
        for key, r in (self.rank_pattern or {}).items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ValueError(f"SPPConfig.rank_pattern[{key!r}] must be a positive integer, got {r!r}")
        if not _is_number(self.spp_dropout) or not 0.0 <= float(self.spp_dropout) < 1.0:
            raise ValueError(f"SPPConfig.spp_dropout must be in [0, 1), got {self.spp_dropout!r}")
        if self.bias not in ("none", "all", "spp_only"):
            raise ValueError(f"SPPConfig.bias must be 'none', 'all' or 'spp_only', got {self.bias!r}")
        if self.sparsity_check not in CHECK_MODES:
            raise ValueError(f"SPPConfig.sparsity_check must be one of {CHECK_MODES}, got {self.sparsity_check!r}")
        if self.chunk_rows is not None and (not isinstance(self.chunk_rows, int) or self.chunk_rows < 1):
            raise ValueError(f"SPPConfig.chunk_rows must be a positive integer or None, got {self.chunk_rows!r}")

    def r_for(self, module_name: str) -> int:
        """``r`` of one module: its ``rank_pattern`` entry, else ``r`` (PEFT's pattern matching)."""
        from peft.utils.other import get_pattern_key

        return self.rank_pattern.get(get_pattern_key(list(self.rank_pattern), module_name), self.r)

    def alpha_for(self, module_name: str) -> float:
        """``spp_alpha`` of one module: its ``alpha_pattern`` entry, else ``spp_alpha``."""
        from peft.utils.other import get_pattern_key

        return self.alpha_pattern.get(get_pattern_key(list(self.alpha_pattern), module_name), self.spp_alpha)

    @property
    def scaling(self) -> float:
        """``s = spp_alpha / r``."""
        from ..kernel import scaling

        return scaling(self.spp_alpha, self.r)
