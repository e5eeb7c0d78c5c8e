"""The recipe's schema: one dataclass per section, whose fields are the section's keys (with their types,
defaults and help text), so the YAML schema, the command-line flags and ``spp-peft keys`` come from one place.

``data:`` and ``train:`` are the training stage's own settings, from its light ``config`` module (not the
trainer): :class:`spp_peft.training.DataConfig` and :class:`spp_peft.training.TrainConfig`.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from spp_peft.training.config import METHODS, DataConfig, TrainConfig


@dataclass
class ModelSection:
    name_or_path: str = field(
        default="smollm2",
        metadata={"help": "'smollm2' (the built-in SmolLM2-135M-Instruct), a local model folder, or a hub id."},
    )
    dtype: str = field(default="float32", metadata={"help": "Parameter dtype: float32, bfloat16 or float16."})
    quantization: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "QLoRA-style: transformers.BitsAndBytesConfig keys, e.g. {load_in_4bit: true, "
                          "bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}. Pruning runs in full "
                          "precision; the pruned model is loaded quantized for training, and the adapter is "
                          "merged into the full-precision pruned model. {} = full precision throughout."},
    )
    compare_full_precision: bool = field(
        default=False,
        metadata={"help": "With quantization: also train each method on the full-precision base (report rows "
                          "side by side)."},
    )


def _doc_attributes(cls) -> dict[str, str]:
    """``{name: text}`` from the "Attributes:" section of a Google-style class docstring."""
    doc = (cls.__doc__ or "").expandtabs()
    if "Attributes:" not in doc:
        return {}
    found: dict[str, str] = {}
    current, indent = None, None
    for line in doc.split("Attributes:", 1)[1].splitlines()[1:]:
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        if width < indent:
            break
        head, sep, text = line.strip().partition(":")
        if width == indent and sep:
            for name in head.split(","):
                found[name.strip()] = text.strip()
            current = [n.strip() for n in head.split(",")]
        elif current:
            for name in current:
                found[name] = f"{found[name]} {line.strip()}"
    return found


def _pruning_config_fields() -> list[tuple[str, Any, Any]]:
    """The fields of ``PruningConfig`` (one definition: the pruning stage's), minus what the pipeline fills in.

    Their help text is the ``Attributes:`` section of ``PruningConfig``'s docstring."""
    from spp_peft.pruning import PruningConfig

    hints = typing.get_type_hints(PruningConfig)
    docs = _doc_attributes(PruningConfig)
    out = []
    for f in dataclasses.fields(PruningConfig):
        if f.name == "calibration_source":  # written by the pipeline from `calibration`
            continue
        metadata = dict(f.metadata)
        metadata.setdefault("help", docs.get(f.name, ""))
        default = field(default=f.default, metadata=metadata) if f.default is not dataclasses.MISSING else \
            field(default_factory=f.default_factory, metadata=metadata)
        out.append((f.name, hints[f.name], default))
    return out


PruningSection = dataclasses.make_dataclass(
    "PruningSection",
    [
        *_pruning_config_fields(),
        ("calibration", str, field(default="builtin", metadata={"help": "Calibration text (see spp_peft.data.load_texts)."})),
        ("nsamples", int, field(default=128, metadata={"help": "Calibration windows (papers: 128)."})),
        ("seqlen", int, field(default=2048, metadata={"help": "Tokens per calibration window (papers: 2048)."})),
    ],
)
PruningSection.__module__ = __name__
PruningSection.__doc__ = (
    "The recipe's ``pruning:`` section: :class:`spp_peft.pruning.PruningConfig` plus the calibration data. "
    "``method: none`` uses the model as it is (already pruned)."
)


@dataclass
class TrainSection(TrainConfig):
    """The recipe's ``train:`` section: :class:`spp_peft.training.TrainConfig` plus which methods to run."""

    methods: list[str] = field(
        default_factory=lambda: ["spp"],
        metadata={"help": f"Methods to fine-tune and compare, among {METHODS}, on the same data and budget."},
    )
    method_lr: dict[str, float] = field(
        default_factory=dict, metadata={"help": "Per-method learning rate overriding lr, e.g. {lora_star: 1e-2}."}
    )

    def train_config(self) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: copy.deepcopy(v) for k, v in vars(self).items() if k in names})

    def lr_for(self, method: str) -> float:
        return float(self.method_lr.get(method, self.lr))


@dataclass
class EvalSection:
    datasets: dict[str, str] = field(
        default_factory=lambda: {"heldout": "builtin:heldout", "ood": "builtin:ood"},
        metadata={"help": "Perplexity sets, {name: text source}: e.g. held-out in-domain and out-of-domain text."},
    )
    seqlen: int = field(default=512, metadata={"help": "Perplexity window length (WikiText-2 protocol)."})
    max_tokens: Optional[int] = field(default=None, metadata={"help": "Evaluate at most this many tokens per set."})
    batch_size: int = field(default=4, metadata={"help": "Windows per forward pass."})
    dense: bool = field(default=True, metadata={"help": "Also evaluate the dense model before pruning."})
    zero_shot_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-eval tasks (needs `pip install lm-eval` and the network), or 'paper7' for the paper's 7."},
    )
    zero_shot_limit: Optional[int] = field(default=None, metadata={"help": "lm-eval: examples per task (None = all)."})
    include_path: Optional[str] = field(
        default=None, metadata={"help": "lm-eval: a folder of your own task YAML files (local tasks by name)."}
    )


@dataclass
class ExportSection:
    methods: list[str] = field(
        default_factory=lambda: ["spp"],
        metadata={"help": "Merged models to export as safetensors (verified, atomic); [] exports none."},
    )
    save_pruned: bool = field(default=True, metadata={"help": "Save the pruned base model (needed by `spp-peft train`)."})


@dataclass
class ReportSection:
    plots: bool = field(default=True, metadata={"help": "Write PNG plots (needs matplotlib)."})


@dataclass
class Recipe:
    """A whole run: one field per section."""

    name: str = field(default="run", metadata={"help": "Run name."})
    output_dir: str = field(default="runs/{name}", metadata={"help": "Output folder ({name} is replaced)."})
    model: ModelSection = field(default_factory=ModelSection)
    pruning: PruningSection = field(default_factory=PruningSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    export: ExportSection = field(default_factory=ExportSection)
    report: ReportSection = field(default_factory=ReportSection)

    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir.replace("{name}", self.name)).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)


def section_classes() -> dict[str, type]:
    """``{section name: dataclass}`` of the recipe's sections."""
    return {name: tp for name, tp in typing.get_type_hints(Recipe).items() if dataclasses.is_dataclass(tp)}

