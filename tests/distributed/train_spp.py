"""Train an SPP adapter on a tiny 2:4-pruned Llama, on one process or several (DDP, FSDP2).

Launched by ``tests/distributed/test_distributed.py``; also a small worked example of multi-process SPP
training. Everything is offline: the model is built from a config (``spp_peft.testing.tiny_llama``) and the
data are fixed random token sequences, identical on every rank.

Runs (``--runs``, comma-separated, executed one after the other in the same processes):
    trainer          transformers' ``Trainer`` (what the pipeline and user scripts use). Under ``torchrun``
                     it runs DDP through accelerate (gloo on CPU). Data order: Trainer's seeded shuffle,
                     split across ranks by accelerate, so 2 processes with per-device batch B see the same
                     global batches as 1 process with batch 2B.
    loop             a plain PyTorch loop (DDP when launched on several processes). Global batch ``k`` is
                     the samples ``[k*G, (k+1)*G)``; rank ``r`` of ``W`` takes the ``r``-th slice of it.
    fsdp-spp         the loop, model sharded by FSDP2 with :func:`spp_peft.distributed.fsdp2_shard`.
    fsdp-accelerate  the loop, model sharded by accelerate's own ``fsdp2_prepare_model`` (see
                     :func:`accelerate_fsdp2`: accelerate does not enable FSDP on CPU by itself).
    fsdp-spp-bf16    fsdp-spp with FSDP2 mixed precision (bf16 parameters and compute, fp32 reduction).
    fsdp-spp-ckpt    fsdp-spp with gradient checkpointing (non-reentrant).

Usage:
    python train_spp.py --out DIR --runs trainer,loop                  # single-process references
    python -m torch.distributed.run --nproc_per_node 2 train_spp.py --out DIR \
        --runs trainer,fsdp-spp,fsdp-accelerate                         # DDP (Trainer) and FSDP2

Output (rank 0): per run the adapter in ``DIR/<run>/adapter`` (PEFT format), the pruned base in ``DIR/base``
(safetensors, so the test reloads the exact base) and ``DIR/result.json`` (losses, timing and, for loop
runs, how many bytes of the frozen weights saved for backward stay allocated between forward and backward).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import spp_peft  # noqa: E402  (registers SPP with PEFT)
from spp_peft import distributed as sdist  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def prune_24(model: torch.nn.Module) -> None:
    """Magnitude 2:4 pruning of the decoder linears, local to this script (tests the trainer, not the pruners)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                w = module.weight
                blocks = w.abs().reshape(w.shape[0], -1, 4)
                drop = blocks.argsort(dim=-1)[..., :2]
                mask = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, drop, True).reshape_as(w)
                w.masked_fill_(mask, 0.0)


def build_model(seed: int = 0, r: int = 16):
    from peft import get_peft_model

    from spp_peft.testing import tiny_llama

    base = tiny_llama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, seed=seed)
    prune_24(base)
    config = spp_peft.SPPConfig(r=r, spp_alpha=2.0 * r, target_modules=TARGETS)
    return base, config, get_peft_model(base, config)


def make_data(num_samples: int, seq_len: int, vocab: int = 256, seed: int = 1234) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (num_samples, seq_len), generator=g)
    return [{"input_ids": row, "labels": row.clone(), "attention_mask": torch.ones_like(row)} for row in ids]


def train_trainer(args, peft_model, data) -> list[float]:
    from transformers import Trainer, TrainingArguments, TrainerCallback

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"global batch {args.global_batch} is not divisible by world size {world}")
    losses: list[float] = []

    class Record(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=os.path.join(args.out_dir, "trainer"),
        per_device_train_batch_size=args.global_batch // world,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        gradient_checkpointing=args.grad_ckpt,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.grad_ckpt else None,
        ddp_find_unused_parameters=False,
    )
    trainer = Trainer(model=peft_model, args=targs, train_dataset=data, callbacks=[Record()])
    trainer.train()
    # The user-facing save path: Trainer.save_model writes the PEFT adapter on the main process only.
    trainer.save_model(os.path.join(args.out_dir, "adapter"))
    return losses


def train_loop(args, peft_model, data, shard=None, checkpointing=False) -> list[float]:
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    per_rank = args.global_batch // world
    if checkpointing:
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if shard == "spp":
        model = sdist.fsdp2_shard(peft_model, reshard_after_forward=not args.no_reshard)
    elif shard == "spp-bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # What accelerate's FSDP2 plugin builds for mixed_precision: bf16 (fp32 sharded master parameters,
        # bf16 gathered parameters and compute, fp32 gradient reduction).
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = sdist.fsdp2_shard(peft_model, reshard_after_forward=not args.no_reshard, mp_policy=policy)
    elif shard == "accelerate":
        model = accelerate_fsdp2(peft_model, reshard_after_forward=not args.no_reshard)
    elif world > 1:
        model = torch.nn.parallel.DistributedDataParallel(peft_model)
    else:
        model = peft_model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    losses = []
    probe = None
    for step in range(args.steps):
        batch = data[step * args.global_batch : (step + 1) * args.global_batch]
        mine = batch[rank * per_rank : (rank + 1) * per_rank]
        inputs = {k: torch.stack([s[k] for s in mine]) for k in mine[0]}
        if step == 0:
            # Record the parameters autograd saves for backward (the kernel saves the unsharded base weight),
            # to report how many bytes of them are still allocated between forward and backward.
            saved: list[torch.Tensor] = []

            def pack(t):
                if isinstance(t, torch.nn.Parameter) and not t.requires_grad and t.dim() == 2:
                    saved.append(t)
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**inputs).loss
            probe = {
                "saved_frozen_weights": len(saved),
                "saved_frozen_weight_bytes": sum(t.numel() * t.element_size() for t in saved),
                "allocated_after_forward_bytes": sum(t.untyped_storage().nbytes() for t in saved),
            }
            del saved
        else:
            loss = model(**inputs).loss  # fixed length, no padding: the mean of rank means is the global mean
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    sdist.save_adapter(model, os.path.join(args.out_dir, "adapter"))
    args.probe = probe
    return losses


RUNS = ("trainer", "loop", "fsdp-spp", "fsdp-accelerate", "fsdp-spp-bf16", "fsdp-spp-ckpt")


def accelerate_fsdp2(peft_model, reshard_after_forward: bool = True):
    """Shard with accelerate's own FSDP2 preparation (``accelerate.utils.fsdp_utils.fsdp2_prepare_model``).

    ``Accelerator.prepare`` calls exactly this function on GPUs, but accelerate never enables FSDP on CPU
    (it stays in MULTI_CPU/DDP mode), so on CPU we call it directly with the few accelerator attributes it
    reads. This runs accelerate's real wrapping (``TRANSFORMER_BASED_WRAP`` over ``_no_split_modules``, the
    tied-embedding tail group, the root) on the SPP model.
    """
    import types

    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=reshard_after_forward,
        cpu_ram_efficient_loading=False, state_dict_type="FULL_STATE_DICT",
    )
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
        mixed_precision="no", is_main_process=dist.get_rank() == 0, device=torch.device("cpu"),
    )
    return fsdp2_prepare_model(accelerator, peft_model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", default="trainer",
                        help=f"comma-separated runs, one after the other in the same processes: {', '.join(RUNS)}")
    parser.add_argument("--no-reshard", action="store_true", help="FSDP2 reshard_after_forward=False")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {RUNS}")

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        sdist.init_process_group("gloo")
    data = make_data(args.steps * args.global_batch, args.seq_len)
    results = {}
    for run in runs:
        start = time.time()
        torch.manual_seed(args.seed)
        _, _, peft_model = build_model(seed=args.seed)
        args.out_dir = os.path.join(args.out, run)
        args.probe = None
        if run == "trainer":
            losses = train_trainer(args, peft_model, data)
        else:
            shard = {"loop": None, "fsdp-spp": "spp", "fsdp-accelerate": "accelerate", "fsdp-spp-bf16": "spp-bf16",
                     "fsdp-spp-ckpt": "spp"}[run]
            losses = train_loop(args, peft_model, data, shard, checkpointing=args.grad_ckpt or run.endswith("-ckpt"))
        results[run] = {"losses": losses, "saved_weights_probe": args.probe, "seconds": round(time.time() - start, 2)}

    if rank == 0:
        from spp_peft.testing import tiny_llama

        clean = tiny_llama(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                           seed=args.seed)
        prune_24(clean)
        clean.save_pretrained(os.path.join(args.out, "base"), safe_serialization=True)
        with open(os.path.join(args.out, "result.json"), "w") as fh:
            json.dump({"world_size": world, "runs": results}, fh, indent=1)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
