"""Multi-process SPP training helpers: process groups, FSDP2 sharding, saving adapters from sharded models.

SPP needs nothing special from distributed engines for *correctness*: the adapter parameters ``spp_A`` /
``spp_B`` are ordinary ``nn.Parameter`` s and the kernel (:class:`spp_peft.kernel.SPPLinearFunction`) is an
ordinary autograd Function. What was checked (``tests/distributed/``, CPU, gloo, 2 processes):

* **DDP** (transformers ``Trainer`` and TRL's ``SFTTrainer`` under ``torchrun`` and under ``accelerate launch
  --config_file configs/accelerate/ddp_cpu.yaml``): the Trainer's adapter after N steps equals
  single-process training with the same global batch and seed.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): the kernel saves the *unsharded* base weight for
  backward. With ``reshard_after_forward=True`` FSDP2 frees that tensor's storage after the block's forward
  (``storage.resize_(0)``: the saved reference then holds no memory) and re-all-gathers into the *same*
  storage in the block's pre-backward hook, before the kernel's backward runs; so the kernel sees the full
  weight again, and the result equals single-process training. No patch to the kernel or the layers is
  needed, and the sharded run does not keep the gathered weights alive between forward and backward.

* **DeepSpeed ZeRO-3** (not run: no GPU and no DeepSpeed where this was written): ZeRO-3 gathers a
  module's parameters in a hook before *that module's* forward. An SPP layer never calls its base layer's
  forward (the kernel reads ``base_layer.weight`` directly) and its factors live in ``ParameterDict`` s,
  so without help the kernel would see ZeRO-3's empty placeholders. :func:`prepare_zero3` marks the SPP
  layers as ZeRO-3 *leaf* modules (``deepspeed.utils.set_z3_leaf_modules``): entering an SPP layer then
  gathers every parameter below it, and the backward pre-hook re-gathers them for the kernel's backward.

accelerate only turns its FSDP plugin on for accelerator devices (CUDA, XPU, NPU, ...): on CPU it silently
stays in DDP mode. :func:`fsdp2_shard` applies the same layout as accelerate's FSDP2 plugin with
``transformer_based_wrap`` (one FSDP unit per decoder block, the rest in the root unit), so the CPU test
exercises the sharding that GPU users get through ``accelerate launch --config_file
configs/accelerate/fsdp.yaml``. See ``docs/scaling.md``.

Nothing here is imported by the tuner; this module imports torch.distributed lazily.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

__all__ = [
    "init_process_group",
    "unwrap_model",
    "fsdp2_shard",
    "adapter_state_dict",
    "save_adapter",
    "is_main_process",
    "prepare_zero3",
]


def init_process_group(backend: Optional[str] = None) -> None:
    """Initialise the default process group from the ``torchrun`` environment (idempotent).

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise; on CUDA the process's device is
    set from ``LOCAL_RANK`` first.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def is_main_process() -> bool:
    """True on rank 0 of the default process group, and when no group is initialised.

    Asks ``torch.distributed`` rather than accelerate's ``PartialState``: a ``PartialState()`` created without
    ``cpu=True`` in a multi-process CPU launch finds no GPU, falls back to a non-distributed state and reports
    *every* rank as the main process (observed with accelerate 1.15 under torchrun and gloo), which would let
    every rank write the same files.
    """
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model under its DDP / DataParallel / DeepSpeed / FSDP1 and ``torch.compile`` wrappers, in any nesting.

    accelerate's ``extract_model_from_parallel`` removes one compile wrapper and then the parallel ones, so it is
    repeated until nothing changes (``DDP(torch.compile(model))`` needs two rounds). FSDP2 does not wrap
    (``fully_shard`` changes the module's class in place), so an FSDP2 model is returned as is.
    """
    from accelerate.utils import extract_model_from_parallel

    while True:
        inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if inner is model:
            return model
        model = inner


def fsdp2_shard(
    model: nn.Module,
    *,
    mesh=None,
    reshard_after_forward: bool = True,
    mp_policy=None,
    offload_policy=None,
) -> nn.Module:
    """Shard a (PEFT-wrapped) decoder with FSDP2: one FSDP unit per decoder block, the rest in the root unit.

    This is the layout accelerate's FSDP2 plugin builds with ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP``
    (see ``configs/accelerate/fsdp.yaml``); use it when you drive FSDP2 yourself (a plain PyTorch loop, or a
    device accelerate does not enable FSDP on, such as CPU). Frozen base weights and trainable SPP factors
    live in the same units: FSDP2 keeps per-parameter ``requires_grad``, gathers both before a block's forward
    and reduce-scatters only the SPP gradients.

    Args:
        model: the model (``PeftModel`` or plain), on its final device.
        mesh: a 1-D ``DeviceMesh``; default: all ranks of the default process group.
        reshard_after_forward: free the gathered block parameters after forward (re-gathered for backward):
            less memory, one more all-gather per block. Safe with the SPP kernel (see the module docstring).
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` (e.g. ``param_dtype=torch.bfloat16``).
        offload_policy: an FSDP2 ``CPUOffloadPolicy``.

    Returns:
        The same model object, now an FSDP module (call the optimiser on ``model.parameters()`` *after*
        sharding: the parameters are replaced by DTensors).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from .models import find_decoder_blocks

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy(),
              "offload_policy": offload_policy or OffloadPolicy()}
    _, blocks = find_decoder_blocks(model)
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root keeps embeddings, final norm and head (tied or not) in one unit; never resharded after forward
    # (its parameters are needed again right at the start of backward).
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def _is_adapter_param(name: str, param: nn.Parameter, prefix: str) -> bool:
    return param.requires_grad or f".{prefix}" in name


def adapter_state_dict(model: nn.Module, prefix: str = "spp_") -> dict[str, torch.Tensor]:
    """Full (unsharded, CPU) tensors of the adapter parameters, keyed by their names in the unwrapped model.

    A collective under FSDP2: **every rank must call it** (each sharded parameter is all-gathered with
    ``DTensor.full_tensor()``). Only the adapter parameters (names containing ``.spp_``) and trainable
    parameters (biases with ``bias="all"``, ``modules_to_save``) are gathered, never the frozen base.
    """
    model = unwrap_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if not _is_adapter_param(name, param, prefix):
            continue
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # DTensor (FSDP2 / tensor parallel)
            tensor = tensor.full_tensor()
        out[name] = tensor.cpu().clone()
    return out


def save_adapter(model: nn.Module, path: str, **save_kwargs) -> None:
    """Save the PEFT adapter of a model that may be DDP-wrapped or FSDP2-sharded, from the main process.

    Under FSDP2 every rank must call this (it gathers the adapter parameters, see :func:`adapter_state_dict`);
    only rank 0 writes. The result is an ordinary PEFT adapter folder that loads into a single-process model.
    With transformers' ``Trainer`` use ``trainer.save_model(path)`` instead (accelerate gathers for you).
    """
    import torch.distributed as dist

    peft_model = unwrap_model(model)
    state = adapter_state_dict(peft_model)
    if is_main_process():
        from spp_peft._utils import atomic_write_dir

        with atomic_write_dir(path, overwrite=True) as tmp:
            peft_model.save_pretrained(str(tmp), state_dict=state, **save_kwargs)
    if dist.is_initialized():
        dist.barrier()


def prepare_zero3(model: nn.Module) -> list[nn.Module]:
    """Mark every SPP layer of ``model`` as a DeepSpeed ZeRO-3 leaf module; call before training starts.

    Needed under ZeRO-3 (see the module docstring): with transformers' ``Trainer`` call it on the PEFT model
    before ``trainer.train()`` (DeepSpeed installs its hooks when accelerate prepares the model). Returns the
    marked modules. Requires ``deepspeed>=0.13`` (``pip install "spp-peft[deepspeed]"``).

    Not verified on a GPU: written from DeepSpeed's documented leaf-module semantics. See docs/scaling.md.
    """
    try:
        from deepspeed.utils import set_z3_leaf_modules
    except ImportError as err:
        raise ImportError(
            "prepare_zero3 needs DeepSpeed >= 0.13 (deepspeed.utils.set_z3_leaf_modules): "
            'pip install "spp-peft[deepspeed]"'
        ) from err
    from .tuner.layer import SPPLayer

    classes = sorted({type(m) for m in model.modules() if isinstance(m, SPPLayer)}, key=lambda c: c.__name__)
    if not classes:
        raise ValueError("prepare_zero3: the model has no SPP layer (call get_peft_model with an SPPConfig first)")
    return list(set_z3_leaf_modules(model, classes))
