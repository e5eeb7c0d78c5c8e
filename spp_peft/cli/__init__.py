"""``spp-peft``: the command line. Argument parsing only; every subcommand calls the pipeline's stages.

    spp-peft demo                                   # the quickstart recipe on the built-in SmolLM2, offline
    spp-peft run configs/quickstart.yaml --set train.lr=3e-2 --train.max_steps 10
    spp-peft prune --model smollm2 --pattern 2:4 --nsamples 32 --seqlen 256 --output runs/x/pruned
    spp-peft train --model runs/x/pruned --method spp --learning-rate 3e-2 --max-steps 20 --output runs/x/spp
    spp-peft merge --model runs/x/pruned --adapter runs/x/spp/adapter --output runs/x/merged
    spp-peft eval --model runs/x/merged --data heldout=builtin:heldout --data ood=builtin:ood
    spp-peft inspect runs/x/merged                  # a model, an adapter or a run folder
    spp-peft estimate --model smollm2               # memory estimate (spp_peft.estimate)
    spp-peft autoload enable                        # any tool loads SPP adapters without `import spp_peft`

Flags of ``prune`` and ``train`` are the keys of the recipe's ``pruning:`` / ``data:`` + ``train:`` sections,
generated from the same dataclasses (``--max-steps`` or ``--max_steps``; a bool key is ``--bf16`` /
``--no-bf16``); the train keys go by ``TrainingArguments``' names (``--learning-rate``,
``--per-device-train-batch-size``; ``--lr``, ``--batch-size`` stay as aliases) and ``train`` takes any other
``TrainingArguments`` field as a flag (``--report_to wandb``). ``run`` and ``demo`` accept any recipe key as
``--set KEY=VALUE`` or ``--KEY VALUE`` with a dotted key (``--train.learning_rate 3e-2``). ``-q`` silences
every progress bar (ours, the Trainer's, transformers', datasets'); ``TQDM_DISABLE=1`` is respected.

Every expected failure is one line on stderr (``spp-peft COMMAND: error: ...`` naming the file, key or
value) and an exit code; ``-v`` / ``--debug`` adds the traceback. Exit codes (see
:data:`spp_peft.cli.errors.EXIT_CODES_HELP`): 0 success, 1 unexpected error (a bug), 2 bad input (recipe,
flags, values, missing or empty files), 3 sparsity violation, 4 I/O error (disk full, unreadable or
truncated file), 5 training diverged (nothing saved), 130 interrupted (Ctrl-C), 141 output closed early
(``| head``).

The modules: ``app`` (:func:`main`), ``parser`` (the parser, flags generated from dataclasses),
``commands`` (one function per subcommand), ``estimate`` (``spp-peft estimate``, delegated), ``inspect``
(``spp-peft inspect``), ``errors`` (the error boundary and exit codes).
"""

from spp_peft.cli.app import DOTTED, PASS_THROUGH, main
from spp_peft.cli.commands import COMMANDS
from spp_peft.cli.errors import (
    EXIT_BAD_INPUT,
    EXIT_BROKEN_PIPE,
    EXIT_CODES_HELP,
    EXIT_DIVERGED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_IO,
    EXIT_OK,
    EXIT_SPARSITY,
    classify,
    guarded,
)
from spp_peft.cli.parser import (
    DEBUG_FLAGS,
    add_dataclass_flags,
    build_parser,
    dataclass_from_flags,
    split_dotted,
    training_flags,
)

__all__ = [
    # app, commands
    "main", "DOTTED", "PASS_THROUGH", "COMMANDS",
    # errors: the boundary and its exit codes
    "guarded", "classify", "EXIT_OK", "EXIT_FAILED", "EXIT_BAD_INPUT", "EXIT_SPARSITY", "EXIT_IO", "EXIT_DIVERGED",
    "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE", "EXIT_CODES_HELP",
    # parser
    "build_parser", "add_dataclass_flags", "dataclass_from_flags", "split_dotted", "training_flags", "DEBUG_FLAGS",
]
