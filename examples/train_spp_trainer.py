"""Fine-tune a pruned model with SPP through transformers' Trainer, on one process or several.

    python examples/train_spp_trainer.py --output runs/spp
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml examples/train_spp_trainer.py --output runs/spp-ddp
    accelerate launch --config_file configs/accelerate/ddp.yaml examples/train_spp_trainer.py --model smollm2 \
        --output runs/spp-gpu --max-steps 200        # 8 GPUs

The model (default: a tiny random Llama, magnitude-pruned 2:4) trains on windows of the built-in offline
text. Only the SPP factors train; the adapter is written to OUTPUT/adapter by the main process, and
merging it keeps every zero of the pruned base. The global batch is the same however many processes
run, so a 2-process launch gives the adapter of a 1-process run (up to float reduction order: tested in
tests/distributed/test_accelerate_launch.py).
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)
from common import parser, pruned_model, training_arguments, use_cpu, write_run


def text_dataset(tokenizer, seq_len: int):
    """Fixed-length windows of the built-in text as a ``datasets.Dataset`` (labels = inputs: the model
    shifts them); no padding, so every process's loss is a mean over the same number of tokens."""
    from datasets import Dataset

    from spp_peft.data import builtin_text, lm_windows

    windows = lm_windows(tokenizer, builtin_text("train"), seq_len).tolist()
    return Dataset.from_dict({"input_ids": windows, "labels": windows})


def main(argv=None) -> None:
    args = parser(__doc__).parse_args(argv)
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    import spp_peft

    model, tokenizer = pruned_model(args)
    model = get_peft_model(model, spp_peft.SPPConfig(r=args.r, spp_alpha=2 * args.r))
    # use_cpu: see common.use_cpu (without it a multi-process CPU launch trains each process alone).
    training_args = TrainingArguments(**training_arguments(args), use_cpu=use_cpu())
    trainer = Trainer(model=model, args=training_args, train_dataset=text_dataset(tokenizer, args.seq_len))
    trainer.train()
    trainer.save_model(f"{args.output}/adapter")  # the PEFT adapter, written by the main process only
    write_run(args, trainer)


if __name__ == "__main__":
    main()
