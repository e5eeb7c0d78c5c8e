"""Saving and loading SPP adapters: the model card, and loaders that always work.

PEFT only knows SPP after ``import spp_peft``. Loading an SPP adapter without that import fails inside
PEFT with a bare ``KeyError: 'SPP'``. The functions here import and register SPP themselves, so they work
from any script; the model card written next to every saved adapter says the same.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

CARD_HEADING = "## SPP adapter (sparsity-preserved)"
#: The last section of the cards spp-peft starts: PEFT adds its version under it, new sections go above it.
VERSIONS_HEADING = "## Versions"
#: Hub tags of every SPP adapter (the sparsity pattern, e.g. ``2:4``, is added per adapter).
CARD_TAGS = ("spp", "sparse", "pruned", "sparsity-preserved")

_LOADING = """### Use it

```bash
pip install spp-peft
```

PEFT knows SPP once `spp_peft` is imported (without it PEFT raises `KeyError: 'SPP'`):

```python
import spp_peft  # registers SPP with PEFT
from peft import PeftModel
model = PeftModel.from_pretrained(pruned_base_model, adapter_path)
merged = model.merge_and_unload()  # same zero pattern as the pruned base
# or, without the import line: model = spp_peft.load_adapter(pruned_base_model, adapter_path)
```

For tools that load adapters themselves (lm-eval's `peft=`, `AutoPeftModelForCausalLM`, `pipeline`), run
`spp-peft autoload enable` once: a start-up hook (module `spp_peft.autoload`) registers SPP in every Python
of this environment, no import needed; `spp-peft autoload disable` removes it.

The adapter records fingerprints of the base's zero masks and refuses a base with different masks."""


def model_card_section(peft_model) -> Optional[str]:
    """The markdown section describing the SPP adapters of ``peft_model`` (None if it has none)."""
    configs = _spp_configs(peft_model)
    if not configs:
        return None
    return "\n".join([
        CARD_HEADING, "",
        "An [SPP](https://arxiv.org/abs/2405.16057) adapter (Lu et al., ICML 2024) made with `spp-peft`. SPP "
        "scales the pruned base weights, `W' = W * (1 + s * B A)`, so merging it keeps every zero of the base: "
        "the merged model has exactly the base's sparsity.", "",
        *[line for name, config in configs.items() for line in _adapter_lines(name, config)], "",
        _LOADING,
    ])


def _spp_configs(peft_model) -> dict:
    from .tuner._registration import spp_peft_type

    return {name: config for name, config in peft_model.peft_config.items()
            if getattr(config, "peft_type", None) == spp_peft_type()}


def _adapter_lines(name: str, config) -> list[str]:
    """The adapter and how its base was pruned: a summary, never the list of layers (hundreds of names)."""
    from ._utils.tensors import numel

    masks = config.base_masks or {}
    total = sum(numel(rec["shape"]) for rec in masks.values())
    zeros = sum(rec["sparsity"] * numel(rec["shape"]) for rec in masks.values())
    lines = [f"- adapter `{name}`: r={config.r}, spp_alpha={config.spp_alpha} (s={config.scaling:g}), "
             f"{len(masks)} target modules ({', '.join(sorted(_short_names(masks)))})",
             f"- base sparsity over the target modules: {zeros / total:.2%}, pattern(s): {', '.join(_patterns(config))}"
             if total else "- base sparsity: unknown (no target recorded)"]
    pruning = config.base_pruning or {}
    if pruning:
        layers = pruning.get("pruned_layers")
        sparsity = pruning.get("sparsity")
        lines.append(f"- base pruned with {pruning.get('method', 'an unknown method')}"
                     + (f" to {sparsity:.0%} sparsity" if isinstance(sparsity, (int, float)) else "")
                     + (f", pattern {pruning['pattern']}" if pruning.get("pattern") else "")
                     + (f", {len(layers)} layers" if isinstance(layers, list) else ""))
    return lines


def _patterns(config) -> list[str]:
    return sorted({rec["pattern"] for rec in (config.base_masks or {}).values()})


def _short_names(masks: dict) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name in masks}


def _card_metadata(card, peft_model) -> None:
    """Hub metadata of an SPP adapter in ``card.data``: the SPP tags and pattern(s), and ``base_model`` when
    known (PEFT writes an empty one, and an empty ``base_model:adapter:`` tag, for an unnamed base)."""
    configs = _spp_configs(peft_model).values()
    base = card.data.base_model or next((c.base_model_name_or_path for c in configs if c.base_model_name_or_path),
                                        None)
    tags = {tag for tag in card.data.tags or [] if tag != "base_model:adapter:"}
    tags |= {*CARD_TAGS, *(p for c in configs for p in _patterns(c) if p != "unstructured")}
    if base:
        tags.add(f"base_model:adapter:{base}")
    card.data.base_model = base or None
    card.data.tags = sorted(tags)


def _new_card(path: str, peft_model) -> None:
    """Start the card of a new adapter folder from a short template (PEFT's default is 5,000 characters of
    "More Information Needed"); PEFT then fills in its metadata and version."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__
    from ._utils import atomic_write_file

    name = getattr(getattr(peft_model, "config", None), "_name_or_path", None)  # PEFT's base_model source
    title = f"# SPP adapter for a pruned {name}" if name else "# SPP adapter for a pruned model"
    text = f"{title}\n\n{VERSIONS_HEADING}\n\n### Framework versions\n\n- spp-peft {__version__}\n"
    atomic_write_file(path, ModelCard.from_template(ModelCardData(library_name="peft"), template_str=text).content)


def replace_section(text: str, heading: str, section: str) -> str:
    """``text`` (a model card) with the section under ``heading`` replaced by ``section`` (which starts with
    ``heading``), or ``section`` added above :data:`VERSIONS_HEADING` (at the end without one): saving again
    into the same folder never repeats a section."""
    if heading not in text:
        head, versions, tail = text.partition("\n" + VERSIONS_HEADING + "\n")
        if versions:
            return head.rstrip("\n") + "\n\n" + section + "\n\n" + versions.lstrip("\n") + tail
        return text.rstrip("\n") + "\n\n" + section + "\n"
    head, _, tail = text.partition(heading)
    rest = tail.split("\n## ", 1)
    return head + section + ("\n\n## " + rest[1] if len(rest) > 1 else "\n")


def write_card_section(path, heading: str, section: str) -> None:
    """Put ``section`` into the model card at ``path`` (see :func:`replace_section`), atomically."""
    from ._utils import atomic_write_file

    text = Path(path).read_text(encoding="utf-8") if os.path.exists(path) else ""
    atomic_write_file(path, replace_section(text, heading, section))


TRAINING_HEADING = "## Training (spp-peft)"
_METHOD_TEXT = {
    "spp": "SPP (sparsity-preserved): merging keeps the base's zeros by construction.",
    "lora_star": "LoRA* baseline: plain LoRA; the merged weight must be re-masked with the base's zero mask "
                 "(`spp_peft.training.merge` does it).",
    "masked_lora": "Masked LoRA (SQFT's SparsePEFT): the update is `s * (B A) * M`; load it with "
                   "`spp_peft.training.load_trained`, which re-attaches the mask.",
}


def training_card_section(info: dict, adapter_name: str) -> str:
    """The model card's training section, from the record ``spp_peft.training.save_adapter`` writes next to
    the adapter (method, lr, train settings, data, result summary)."""
    from .kernel import scaling

    method, cfg, lr = info["method"], info["train"], info["lr"]
    lines = [
        TRAINING_HEADING, "",
        f"- method: `{method}`. {_METHOD_TEXT.get(method, '')}",
        f"- r={cfg['r']}, alpha={cfg['alpha']:g} (s={scaling(cfg['alpha'], cfg['r']):g}), "
        f"targets: {', '.join(cfg['target_modules'])}",
        f"- lr={lr:g}, scheduler={cfg['lr_scheduler']}, warmup={cfg['warmup']:g}, "
        f"weight decay={cfg['weight_decay']:g}, batch={cfg['batch_size']}x{cfg['grad_accum']}",
    ]
    if info.get("data"):
        lines.append("- data: " + ", ".join(f"{k}={v}" for k, v in info["data"].items()))
    summary = info.get("result")
    if summary is not None:
        lines.append(f"- {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['seconds']:.0f} s; "
                     f"loss {summary['first_loss']} -> {summary['final_loss']}")
    lines.append(f"- load and merge: `spp-peft merge --model BASE --adapter {adapter_name} --output OUT`")
    return "\n".join(lines)


def write_training_card(path, info: dict, adapter_name: str) -> None:
    """Add (or replace) the training section of the model card at ``path``."""
    write_card_section(path, TRAINING_HEADING, training_card_section(info, adapter_name))


def install_model_card_hook() -> None:
    """Extend ``PeftModel.create_or_update_model_card`` with the SPP section and hub metadata (idempotent)."""
    from peft import PeftModel

    original = PeftModel.create_or_update_model_card
    if getattr(original, "_spp_wrapped", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        section = model_card_section(self)
        path = os.path.join(output_dir, "README.md")
        if section is not None and not os.path.exists(path):
            _new_card(path, self)
        original(self, output_dir)
        if section is not None:
            _update_card(path, self, section)

    create_or_update_model_card._spp_wrapped = True
    create_or_update_model_card.__doc__ = original.__doc__
    PeftModel.create_or_update_model_card = create_or_update_model_card


def _update_card(path: str, peft_model, section: str) -> None:
    """The SPP section and metadata into the card PEFT just wrote at ``path``, atomically."""
    from huggingface_hub import ModelCard

    from ._utils import atomic_write_file

    card = ModelCard.load(path)
    _card_metadata(card, peft_model)
    card.text = replace_section(card.text, CARD_HEADING, section)
    atomic_write_file(path, card.content)


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

    from .tuner import SPPConfig  # importing the tuner registers SPP with PEFT

    config = SPPConfig.from_pretrained(adapter_path)
    config.verify_base_masks = verify_base_masks
    return PeftModel.from_pretrained(
        model, adapter_path, adapter_name=adapter_name, is_trainable=is_trainable, config=config, **kwargs
    )


def merge_into(model: nn.Module, adapter_path: str, safe_merge: bool = True, **kwargs) -> nn.Module:
    """Load an SPP adapter onto ``model`` and merge it: the merged plain transformers model, same zeros.

    The usual QLoRA-style deployment: an adapter trained on a 4-bit / 8-bit copy of the pruned model merges
    into the full-precision pruned model. Its recorded masks are of the dequantized base; the full-precision
    base is checked by passing it through the same quantizer, so a wrong base is still refused.
    """
    return load_adapter(model, adapter_path, **kwargs).merge_and_unload(safe_merge=safe_merge)


def _spp_adapter_config(path, peft_config):
    """The SPPConfig of an adapter folder (or the given config) if it is an SPP adapter, else None."""
    from .tuner._registration import spp_peft_type
    from .tuner import SPPConfig

    if peft_config is not None:
        return peft_config if getattr(peft_config, "peft_type", None) == spp_peft_type() else None
    config_file = os.path.join(str(path), "adapter_config.json") if path is not None else None
    if config_file is None or not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as handle:
        if json.load(handle).get("peft_type") != spp_peft_type().value:
            return None
    return SPPConfig.from_pretrained(str(path))


def check_adapter_file(model: nn.Module, path, adapter_name: str, peft_config=None, state_dict=None) -> None:
    """Check an SPP adapter's tensors against ``model`` (not yet adapted) before any loader writes them.

    transformers' ``load_adapter`` copies the file's tensors into the model itself, past PEFT's loading code;
    this runs the same checks as every PEFT path (:func:`spp_peft.tuner.checks.check_adapter_tensors`).
    """
    from peft.utils import load_peft_weights

    from .tuner.checks import check_adapter_tensors, resolve_targets, validate_targets
    from .tuner.model import SPPModel

    config = _spp_adapter_config(path, peft_config)
    if config is None:
        return
    config = SPPModel._prepare_adapter_config(copy.deepcopy(config), getattr(model, "config", None))
    targets = validate_targets(resolve_targets(model, config), config)
    if state_dict is None:
        state_dict = load_peft_weights(str(path), device="cpu")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_adapter_tensors(state_dict, targets, config, adapter_name, shapes)


def install_load_guard() -> None:
    """Make transformers' ``model.load_adapter`` check SPP adapter files first (idempotent)."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers without its PEFT integration
        return
    original = PeftAdapterMixin.load_adapter
    if getattr(original, "_spp_wrapped", False):
        return

    @functools.wraps(original)
    def load_adapter(self, peft_model_id=None, adapter_name=None, peft_config=None, adapter_state_dict=None,
                     *args, **kwargs):
        check_adapter_file(self, peft_model_id, adapter_name or "default", peft_config, adapter_state_dict)
        return original(self, peft_model_id, adapter_name, peft_config, adapter_state_dict, *args, **kwargs)

    load_adapter._spp_wrapped = True
    PeftAdapterMixin.load_adapter = load_adapter


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
