"""spp-peft: SPP (sparsity-preserved parameter-efficient fine-tuning) for HuggingFace PEFT.

Importing this package registers SPP with PEFT (``PeftType.SPP``), after which ``SPPConfig`` works with
``get_peft_model``, ``PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` like any
built-in method. Lu et al., "SPP: Sparsity-Preserved Parameter-Efficient Fine-Tuning for Large Language
Models", ICML 2024, arXiv:2405.16057.
"""

from . import _registration
from .hub import AutoSPPModelForCausalLM, install_load_guard, install_model_card_hook, load_adapter
from .sparsity import SparsityViolation, assert_same_sparsity, sparsity_report
from .tuner import AdapterFileError, SPPConfig, SPPLayer, SPPModel

__version__ = "0.1.0"

_registration.register()
install_model_card_hook()
install_load_guard()

__all__ = [
    "SPPConfig",
    "SPPModel",
    "SPPLayer",
    "SparsityViolation",
    "AdapterFileError",
    "sparsity_report",
    "assert_same_sparsity",
    "load_adapter",
    "AutoSPPModelForCausalLM",
    "__version__",
]
