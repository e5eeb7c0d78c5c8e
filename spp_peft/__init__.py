"""spp-peft: SPP (sparsity-preserved parameter-efficient fine-tuning) for HuggingFace PEFT.

Importing this package registers SPP with PEFT (``PeftType.SPP``), after which ``SPPConfig`` works with
``get_peft_model``, ``PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` like any
built-in method. Registration happens as soon as PEFT is imported (at once if it already is), so importing a
light module such as ``spp_peft.sparsity`` or ``spp_peft.pruning`` does not pull in PEFT and the tuner.
Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language Models", ICML 2024,
arXiv:2405.16057.
"""

import importlib

from ._hooks import when_imported

__version__ = "0.1.0"

# Public names, imported on first use (PEP 562) so that the package itself stays light.
_PUBLIC = {
    "SPPConfig": "tuner",
    "SPPModel": "tuner",
    "SPPLayer": "tuner",
    "AdapterFileError": "tuner",
    "SparsityViolation": "sparsity",
    "assert_same_sparsity": "sparsity",
    "sparsity_report": "sparsity",
    "load_adapter": "hub",
    "merge_into": "hub",
    "AutoSPPModelForCausalLM": "hub",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


def _activate() -> None:
    """Register SPP with PEFT and extend PEFT's model card and transformers' adapter loading."""
    importlib.import_module(".tuner", __name__)  # registers SPP (a no-op while the tuner itself is importing)
    hub = importlib.import_module(".hub", __name__)
    hub.install_model_card_hook()
    hub.install_load_guard()


when_imported("peft", _activate)
