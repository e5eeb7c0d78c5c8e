"""The stages of a run, each a small function over the library from a recipe section: load, prune, prepare the
evaluation sets, evaluate. The CLI (:mod:`spp_peft.cli`) calls the same functions."""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any, Optional

import torch
from torch import nn

from spp_peft._utils import parse_dtype
from spp_peft.recipe import expand_tasks


def load(model_section) -> tuple[nn.Module, Any]:
    """Load the model and tokenizer named by the recipe's ``model:`` section."""
    from spp_peft.errors import reading
    from spp_peft.models import load_model

    with reading(model_section.name_or_path, "model.name_or_path"):  # a truncated file names itself
        return load_model(model_section.name_or_path, dtype=parse_dtype(model_section.dtype))


def pruning_config(section, calibration_source: Optional[str] = None):
    """The :class:`spp_peft.pruning.PruningConfig` of a recipe's ``pruning:`` section."""
    from spp_peft.pruning import PruningConfig

    names = {f.name for f in dataclasses.fields(PruningConfig)}
    values = {k: v for k, v in vars(section).items() if k in names}
    values["calibration_source"] = calibration_source or section.calibration
    if values.get("seed") is None:
        values["seed"] = 0
    return PruningConfig(**values)


def prune_model(model: nn.Module, tokenizer, section, show_progress: bool = True):
    """Prune ``model`` in place as the ``pruning:`` section says; returns the ``PruningResult`` (None for 'none')."""
    if section.method == "none":
        return None
    from spp_peft.data import calibration_windows, load_texts
    from spp_peft.pruning import attach_metadata, prune_with_config

    config = pruning_config(section)
    calibration = None
    if config.needs_calibration:
        calibration = calibration_windows(tokenizer, load_texts(section.calibration), section.nsamples,
                                          section.seqlen, seed=config.seed)
    result = prune_with_config(model, config, calibration, show_progress=show_progress)
    attach_metadata(model, result)
    return result


def eval_sets(tokenizer, section) -> dict[str, torch.Tensor]:
    """The token streams of the ``eval.datasets``, each cut to ``eval.max_tokens`` (tokenized once)."""
    from spp_peft.data import load_texts, token_stream

    sets = {}
    for name, source in section.datasets.items():
        ids = token_stream(tokenizer, load_texts(source))
        if section.max_tokens is not None:
            ids = ids[: section.max_tokens]
        usable = (ids.numel() // section.seqlen) * section.seqlen
        if usable == 0:
            raise ValueError(f"eval.datasets.{name} ({source}) has {ids.numel()} tokens, fewer than one "
                             f"window of eval.seqlen={section.seqlen}")
        sets[name] = ids[:usable]
    return sets


def evaluate(model: nn.Module, sets: dict[str, torch.Tensor], section, show_progress: bool = True) -> dict[str, float]:
    """Perplexity (WikiText-2 protocol) of ``model`` on every prepared set."""
    from spp_peft.evaluation import perplexity

    return {
        name: perplexity(model, ids, seqlen=section.seqlen, batch_size=section.batch_size,
                         show_progress=show_progress)
        for name, ids in sets.items()
    }


def zero_shot(model: nn.Module, tokenizer, section) -> Optional[dict[str, float]]:
    """lm-eval accuracies for ``eval.zero_shot_tasks`` (None when no task is asked for)."""
    tasks = expand_tasks(section.zero_shot_tasks)
    if not tasks:
        return None
    from spp_peft.evaluation import local_tasks_only
    from spp_peft.evaluation import zero_shot as lm_eval_zero_shot

    # Indexing lm-eval's own task zoo takes seconds; skip it when every task is local.
    return lm_eval_zero_shot(model, tokenizer, tasks, limit=section.zero_shot_limit, batch_size=section.batch_size,
                             include_path=section.include_path,
                             include_defaults=not local_tasks_only(tasks, section.include_path))


#: Distributions whose version a run's numbers may depend on: reported as null when not installed.
_VERSIONED = ("accelerate", "datasets", "huggingface_hub", "lm_eval", "trl", "bitsandbytes")


def environment() -> dict:
    """The versions and hardware a run's numbers come from (the optional libraries: null when not installed;
    read from their metadata, so none is imported for it)."""
    from importlib.metadata import PackageNotFoundError, version

    import peft
    import transformers

    import spp_peft

    def installed(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "spp_peft": spp_peft.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        **{name: installed(name) for name in _VERSIONED},
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
