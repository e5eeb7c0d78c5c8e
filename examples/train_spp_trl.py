"""Fine-tune a pruned model with SPP through TRL's SFTTrainer (``peft_config=SPPConfig(...)``).

    python examples/train_spp_trl.py --output runs/spp-sft
    accelerate launch --config_file configs/accelerate/ddp_cpu.yaml examples/train_spp_trl.py --output runs/spp-sft-ddp

SFTTrainer wraps the pruned model with the SPP adapter itself, exactly as it does with a LoraConfig. The
data are prompt / completion pairs made from the built-in offline instructions ("Explain the Python
language topic X." -> the topic's text); TRL trains on the completion tokens only. The adapter is written to
OUTPUT/adapter by the main process; merging it keeps every zero of the pruned base.
"""

from __future__ import annotations

import common  # noqa: F401  (puts the checkout on sys.path)
from common import parser, pruned_model, training_arguments, use_cpu, write_run


def instruction_dataset():
    from datasets import Dataset

    from spp_peft.data import builtin_instructions

    records = builtin_instructions("train")
    return Dataset.from_dict({"prompt": [r["instruction"] + "\n" for r in records],
                              "completion": [r["output"] for r in records]})


def main(argv=None) -> None:
    p = parser(__doc__)
    p.set_defaults(seq_len=128)  # room for the prompt and some of the completion (the tiny model reads bytes)
    args = p.parse_args(argv)
    from trl import SFTConfig, SFTTrainer

    import spp_peft

    model, tokenizer = pruned_model(args)
    # use_cpu: see common.use_cpu (without it a multi-process CPU launch trains each process alone).
    config = SFTConfig(**training_arguments(args), max_length=args.seq_len, use_cpu=use_cpu())
    trainer = SFTTrainer(model=model, args=config, train_dataset=instruction_dataset(), processing_class=tokenizer,
                         peft_config=spp_peft.SPPConfig(r=args.r, spp_alpha=2 * args.r))
    trainer.train()
    trainer.save_model(f"{args.output}/adapter")
    write_run(args, trainer)


if __name__ == "__main__":
    main()
