"""Fine-tuning a pruned model with transformers' ``Trainer``: SPP and the baselines it is compared with.

Methods (all trained on the same data with the same budget, so that comparisons are honest): ``spp``,
``lora_star`` (LoRA, merged, re-masked), ``masked_lora`` (SQFT's SparsePEFT) and ``none`` (the pruned model
as it is); see :mod:`.methods` and :mod:`.baselines`.

    config.py       DataConfig, TrainConfig (checked when built), METHODS; light, the recipe's schema
    dataset.py      training examples (a datasets.Dataset of text windows or instruction records), the collator
    baselines.py    the LoRA baselines: MaskedLoraVariant, the LoRA* re-mask
    methods.py      per method: prepare_model, save_adapter, read_method, load_trained, merge
    checkpoints.py  the run-settings record, resume from the newest complete checkpoint
    arguments.py    TrainingArguments from a TrainConfig, the checks of its pass-through `args`
    trainer.py      train, TrainResult, the divergence guard

Names are imported on first use (PEP 562), so ``from spp_peft.training import TrainConfig`` loads only
``config.py``, not transformers' Trainer or peft.
"""

import importlib

_PUBLIC = {
    "METHODS": "config",
    "TRAINED_METHODS": "config",
    "DEFAULT_TARGETS": "config",
    "DataConfig": "config",
    "TrainConfig": "config",
    "check_method": "config",
    "TokenDataset": "dataset",
    "data_collator": "dataset",
    "build_dataset": "dataset",
    "MASK_BUFFER": "baselines",
    "MaskedLoraVariant": "baselines",
    "attach_masked_lora": "baselines",
    "remask": "baselines",
    "METHOD_FILE": "methods",
    "peft_config": "methods",
    "prepare_model": "methods",
    "save_adapter": "methods",
    "read_method": "methods",
    "load_trained": "methods",
    "merge": "methods",
    "is_resume": "checkpoints",
    "last_checkpoint": "checkpoints",
    "TrainResult": "trainer",
    "training_arguments": "arguments",
    "train": "trainer",
}
# Internal names kept at their old path for the pipeline and the tests that use them.
_INTERNAL = {
    "_VOLATILE": "checkpoints",
    "_last_complete_checkpoint": "checkpoints",
    "_prepare_checkpoints": "checkpoints",
    "_run_identity": "checkpoints",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name) or _INTERNAL.get(name)
    if module is not None:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
