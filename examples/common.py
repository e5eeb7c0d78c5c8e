"""What the example scripts share: the command line, a pruned model to fine-tune, the process count.

Not part of the library: plain transformers / PEFT / spp_peft calls that a user script would make.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Runnable from a checkout without installing the package (`python examples/X.py`, `accelerate launch ...`).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder for the adapter (output/adapter) and run.json")
    p.add_argument("--model", default="tiny",
                   help="'tiny' (a random 2-layer Llama, seconds on a CPU), 'smollm2' (built in) or a local folder")
    p.add_argument("--prune", default="2:4",
                   help="magnitude-prune the decoder linears to this N:M pattern first; 'none' if already pruned")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8,
                   help="sequences per optimizer step over all processes (per device = this / processes)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p


def world_size() -> int:
    """The number of processes of this launch (``accelerate launch`` and ``torchrun`` set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch(args) -> int:
    """Keep the global batch whatever the number of processes, so every launch trains the same steps."""
    world = world_size()
    if args.global_batch_size % world:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by {world} processes")
    return args.global_batch_size // world


def use_cpu() -> bool:
    """Ask for the CPU explicitly when there is no GPU: without it each process of a multi-process CPU launch
    falls back to a non-distributed run (see configs/accelerate/ddp_cpu.yaml)."""
    return not torch.cuda.is_available()


def training_arguments(args) -> dict:
    """The ``TrainingArguments`` fields both examples use (TRL's ``SFTConfig`` takes the same)."""
    return dict(
        output_dir=f"{args.output}/checkpoints",
        per_device_train_batch_size=per_device_batch(args),
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        ddp_find_unused_parameters=False,  # every SPP factor takes part in every forward
    )


def pruned_model(args):
    """``(model, tokenizer)``: the model of ``--model``, magnitude-pruned to ``--prune`` (identical on every
    process: the tiny model is built from a seed, pruning is deterministic)."""
    if args.model == "tiny":
        from spp_peft.testing import byte_tokenizer, tiny_llama

        model, tokenizer = tiny_llama(seed=args.seed), byte_tokenizer()
    else:
        from spp_peft.models import load_model

        model, tokenizer = load_model(args.model)
    if args.prune != "none":
        from spp_peft.pruning import prune

        prune(model, method="magnitude", pattern=args.prune, show_progress=False)
    return model, tokenizer


def write_run(args, trainer) -> None:
    """Each process says which rank of how many it was; the main one writes ``output/run.json`` (the world
    size, the distributed type and the logged losses)."""
    state = trainer.accelerator.state
    print(f"spp example: process {state.process_index} of {state.num_processes} ({state.distributed_type})",
          flush=True)
    if not trainer.is_world_process_zero():
        return
    run = {"world_size": state.num_processes, "distributed_type": str(state.distributed_type),
           "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
           "global_step": trainer.state.global_step}
    (Path(args.output) / "run.json").write_text(json.dumps(run, indent=1) + "\n")
