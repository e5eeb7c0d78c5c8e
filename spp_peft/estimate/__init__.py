"""Memory planning: how much memory one device needs to fine-tune a model with SPP, LoRA or in full.

Use it to pick a topology (number of devices, FSDP / ZeRO-3, gradient checkpointing, micro-batch) before
renting GPUs::

    from spp_peft.estimate import EstimateSettings, estimate_memory, format_estimate
    rows = [estimate_memory(EstimateSettings("smollm2", method=m, batch_size=8, seq_len=1024))
            for m in ("spp", "lora", "full")]
    print(format_estimate(rows))

(``estimate_memory("smollm2", method=m, batch_size=8, ...)`` is the same call), or ``spp-peft estimate
--model smollm2 --batch-size 8 --seq-len 1024``, or ``python -m spp_peft.estimate ...``.

- :mod:`.settings`: :class:`EstimateSettings`, every input, validated; the CLI flags are generated from it;
- :mod:`.shape`: the model's shape from its config alone (:func:`model_shape`, the built-in SmolLM2);
- :mod:`.components`: one function per memory component (its docstring states what is counted) and
  :func:`estimate_memory`, their sum at the peak;
- :mod:`.result`: :class:`MemoryEstimate` and :func:`format_estimate`;
- :mod:`.command`: ``spp-peft estimate`` (:func:`add_estimate_arguments`, :func:`run_estimate`).

Validation: ``tests/estimate/test_estimate.py::test_estimate_matches_measured_peak_rss`` (``slow``) trains
SmolLM2-135M on CPU in a fresh process and compares the estimate with the measured peak RSS of the
training steps (minus the RSS of the process before the model was loaded); see ``docs/scaling.md`` for
the recorded figures. Not modelled: communication buffers of NCCL / gloo, the KV cache (training has
none), allocator caching beyond ``overhead_gib``, optimizer states other than AdamW / SGD.
"""

from .command import add_estimate_arguments, main, run_estimate, settings_from_args
from .components import estimate_memory
from .result import GIB, MemoryEstimate, format_estimate
from .settings import ATTENTIONS, METHODS, OPTIMIZERS, SHARDINGS, EstimateSettings
from .shape import SMOLLM2_135M_CONFIG, ModelShape, load_config, model_shape

__all__ = [
    "EstimateSettings",
    "ModelShape",
    "MemoryEstimate",
    "model_shape",
    "load_config",
    "estimate_memory",
    "format_estimate",
    "add_estimate_arguments",
    "settings_from_args",
    "run_estimate",
    "main",
    "METHODS",
    "SHARDINGS",
    "OPTIMIZERS",
    "ATTENTIONS",
    "GIB",
    "SMOLLM2_135M_CONFIG",
]
