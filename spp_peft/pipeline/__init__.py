"""The whole job from a recipe: load -> prune -> fine-tune each method -> merge -> verify -> evaluate ->
export -> report.

- :mod:`.stages`: each stage a small function over the library (:mod:`spp_peft.models`,
  :mod:`spp_peft.pruning`, :mod:`spp_peft.evaluation`); the CLI calls the same functions;
- :mod:`.runner`: :func:`run` chains them and returns a :class:`~spp_peft.results.RunResults`, the content of
  ``report.json``; merging and the verified export come from :mod:`spp_peft.training` and
  :mod:`spp_peft.export`;
- :mod:`.folder`: the run folder, checked before any work and held while the run writes to it.

Layout of a run folder::

    recipe.yaml            the resolved recipe (defaults and overrides filled in)
    run.log                the log
    pruned/                the pruned base (safetensors, pruning metadata in config.json)
    <method>/adapter/      the trained adapter, model card, spp_peft_training.json
    <method>/checkpoints/  Trainer checkpoints (train.save_steps > 0); a rerun resumes from them
    <method>/train_log.json
    merged/<method>/       the exported merged model (export.methods), verified before it appears
    report.md, report.json, plots/*.png
"""

from spp_peft.results import RunResults

from .folder import check_output_dir, claim_output_dir
from .runner import run
from .stages import environment, eval_sets, evaluate, load, prune_model, pruning_config, zero_shot

__all__ = [
    "RunResults",
    "check_output_dir",
    "claim_output_dir",
    "environment",
    "eval_sets",
    "evaluate",
    "load",
    "prune_model",
    "pruning_config",
    "run",
    "zero_shot",
]
