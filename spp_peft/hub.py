"""Saving and loading SPP adapters: the model card, and loaders that always work.

PEFT only knows SPP after ``import spp_peft``. Loading an SPP adapter without that import fails inside
PEFT with a bare ``KeyError: 'SPP'``. The functions here import and register SPP themselves, so they work
from any script; the model card written next to every saved adapter says the same.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

CARD_HEADING = "## SPP adapter (sparsity-preserved)"


def model_card_section(peft_model) -> Optional[str]:
    """The markdown section describing the SPP adapters of ``peft_model`` (None if it has none)."""
    from ._registration import spp_peft_type

    sections = []
    for name, config in peft_model.peft_config.items():
        if getattr(config, "peft_type", None) != spp_peft_type():
            continue
        masks = config.base_masks or {}
        total = sum(_numel(rec["shape"]) for rec in masks.values())
        zeros = sum(rec["sparsity"] * _numel(rec["shape"]) for rec in masks.values())
        patterns = sorted({rec["pattern"] for rec in masks.values()})
        lines = [
            f"- adapter `{name}`: r={config.r}, spp_alpha={config.spp_alpha} (s={config.spp_alpha / config.r:g}), "
            f"{len(masks)} target modules ({', '.join(sorted(_short_names(masks)))})",
            f"- base sparsity over the target modules: {zeros / total:.2%}, pattern(s): {', '.join(patterns)}"
            if total else "- base sparsity: unknown (no target recorded)",
        ]
        if config.base_pruning:
            described = ", ".join(f"{k}={v}" for k, v in config.base_pruning.items() if not isinstance(v, dict))
            lines.append(f"- base pruned with: {described}")
        sections.append("\n".join(lines))
    if not sections:
        return None
    return "\n".join(
        [
            CARD_HEADING,
            "",
            "This is an [SPP](https://arxiv.org/abs/2405.16057) adapter (Lu et al., ICML 2024) made with "
            "`spp-peft`. SPP scales the pruned base weights, `W' = W * (1 + s * B A)`, so merging it keeps "
            "every zero of the base: the merged model has exactly the base's sparsity.",
            "",
            *sections,
            "",
            "Loading needs `import spp_peft` first (it registers SPP with PEFT; without it PEFT raises "
            "`KeyError: 'SPP'`), or use `spp_peft.load_adapter(model, path)`. The adapter records fingerprints "
            "of the base's zero masks and refuses a base with different masks.",
            "",
            "```python",
            "import spp_peft",
            "from peft import PeftModel",
            "model = PeftModel.from_pretrained(pruned_base_model, adapter_path)",
            "merged = model.merge_and_unload()  # same zero pattern as the pruned base",
            "```",
        ]
    )


def _numel(shape) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total


def _short_names(masks: dict) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in masks}


def install_model_card_hook() -> None:
    """Extend ``PeftModel.create_or_update_model_card`` with the SPP section (idempotent)."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_spp_wrapped", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        original(self, output_dir)
        section = model_card_section(self)
        if section is None:
            return
        path = os.path.join(output_dir, "README.md")
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        if CARD_HEADING in text:  # replace our previous section, keep the rest
            head, _, tail = text.partition(CARD_HEADING)
            rest = tail.split("\n## ", 1)
            text = head + section + ("\n\n## " + rest[1] if len(rest) > 1 else "\n")
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        from spp_peft._utils import atomic_write_file

        atomic_write_file(path, text)

    create_or_update_model_card._spp_wrapped = True
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card


def load_adapter(
    model: nn.Module,
    adapter_path: str,
    adapter_name: str = "default",
    is_trainable: bool = False,
    verify_base_masks: bool = True,
    **kwargs,
):
    """Load a saved SPP adapter onto ``model`` (the pruned base) and return the ``PeftModel``.

    Works without a prior ``import spp_peft``. With ``verify_base_masks=False`` the fingerprint check is
    skipped (for bases you know to match despite a different mask, e.g. re-pruned identically on another
    machine with different tie-breaking).
    """
    from peft import PeftModel

    from .tuner import SPPConfig

    config = SPPConfig.from_pretrained(adapter_path)
    config.verify_base_masks = verify_base_masks
    return PeftModel.from_pretrained(
        model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


class AutoSPPModelForCausalLM:
    """Load base model + SPP adapter in one call, like ``peft.AutoPeftModelForCausalLM``.

    Example:
        >>> model = AutoSPPModelForCausalLM.from_pretrained("runs/demo/adapter")
        >>> model = AutoSPPModelForCausalLM.from_pretrained("runs/demo/adapter", base_model=pruned_model)
    """

    @classmethod
    def from_pretrained(
        cls,
        adapter_path: str,
        base_model: Optional[nn.Module] = None,
        torch_dtype: Optional[torch.dtype] = None,
        **kwargs,
    ):
        from transformers import AutoModelForCausalLM

        from .tuner import SPPConfig

        if base_model is None:
            config = SPPConfig.from_pretrained(adapter_path)
            if not config.base_model_name_or_path:
                raise ValueError(
                    f"The adapter at '{adapter_path}' does not name its base model; pass base_model= explicitly."
                )
            base_model = AutoModelForCausalLM.from_pretrained(config.base_model_name_or_path, dtype=torch_dtype)
        return load_adapter(base_model, adapter_path, **kwargs)
