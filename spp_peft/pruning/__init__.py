"""One-shot pruning of HuggingFace decoders: magnitude, Wanda and SparseGPT, unstructured or N:M.

>>> from spp_peft.pruning import prune, save_pruned
>>> result = prune(model, method="wanda", sparsity=0.5, calibration=ids)      # ids: (nsamples, seqlen)
>>> result = prune(model, method="sparsegpt", pattern="2:4", calibration=ids)
>>> print(result.report.format())

Only the linear layers inside the decoder blocks are pruned (embeddings and ``lm_head`` stay dense, as in
the papers). The pruned model is an ordinary dense-storage model whose zeros are the pruning mask; its
metadata lives in ``model.config.spp_pruning`` so that later stages (the SPP adapter, reports) can read it.

The package: ``config.py`` (:class:`PruningConfig`), ``methods.py`` (the registry of methods that
:func:`prune` dispatches through), ``run.py`` (:func:`prune`), ``result.py`` (:class:`PruningResult`),
``io.py`` (:func:`save_pruned`, the metadata), ``calibration.py`` (block-by-block calibration) and one
module per method over the shared ``common.py``.

References:
    * Han et al., 2015, "Learning both Weights and Connections for Efficient Neural Networks" (magnitude).
    * Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models" (Wanda).
    * Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot".
"""

from spp_peft.pruning.config import PruningConfig
from spp_peft.pruning.io import CONFIG_KEY, attach_metadata, pruning_metadata, save_pruned
from spp_peft.pruning.methods import METHODS, REGISTRY, PruningMethod
from spp_peft.pruning.result import LayerPruning, PruningResult
from spp_peft.pruning.run import prune, prune_with_config

__all__ = [
    "METHODS",
    "REGISTRY",
    "PruningMethod",
    "CONFIG_KEY",
    "PruningConfig",
    "LayerPruning",
    "PruningResult",
    "prune",
    "prune_with_config",
    "save_pruned",
    "attach_metadata",
    "pruning_metadata",
]
