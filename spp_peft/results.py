"""What a run measured, as data objects: :class:`RunResults` and its parts.

:func:`spp_peft.pipeline.run` fills a :class:`RunResults`; :mod:`spp_peft.report` reads it and writes
``report.json`` from :meth:`RunResults.to_dict`. :meth:`RunResults.from_dict` reads such a dict back (a
``report.json``, or a dict holding only some of its sections, as a notebook writes by hand), keeping the keys
it does not know. This module imports nothing heavy, so that reading a report needs neither torch nor the
pipeline.

The dict, section by section (models are ``dense``, ``pruned`` and the methods in the order they ran)::

    name, model, output_dir, recipe, environment, seconds
    perplexity:  {dataset: {"dense": float, "pruned": float, method: float, ...}}
    datasets:    {dataset: {"source": str, "tokens": int}}
    training:    {method: TrainResult.summary() (steps, seconds, lr, losses [[step, loss], ...], ...)}
    sparsity:    {model: SparsityReport.to_dict()}
    verified:    {method: {"ok": bool, "layers": int, "message": str}}
    export:      {method: path}
    zero_shot:   {model: {task: accuracy}}
    timings:     {stage: wall seconds}      cpu_seconds: {stage: process CPU seconds}
    budget:      {steps, epochs, batch_size, seqlen}   the fine-tuning budget every method shares
    pruning:     {method, pattern, sparsity, seconds, calibration, ...}   the pruning metadata
    data:        {examples, tokens}                     the fine-tuning data
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Union

__all__ = ["Budget", "EvalSet", "ModelResult", "RunResults", "Timings", "TrainingData", "Verification",
           "as_results"]


class _Record:
    """A flat section of the results: the dict is the dataclass's fields, unknown keys are dropped."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Verification(_Record):
    """Whether a merged model kept the pruned base's zero set (:func:`spp_peft.export.verify`)."""

    ok: bool = False
    layers: Optional[int] = None
    message: str = ""


@dataclass
class EvalSet(_Record):
    """An evaluation set: where its text came from and how many tokens were scored."""

    source: str = ""
    tokens: int = 0


@dataclass
class Budget(_Record):
    """The fine-tuning budget, identical for every method (batch_size counts gradient accumulation).

    Only the setting that governs is recorded, as ``TrainingArguments`` reads them: ``steps`` when
    ``max_steps > 0`` (``epochs`` is then null: it was ignored), else ``epochs`` (``steps`` null). The steps
    each method ran are in its ``training.steps``.
    """

    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    seqlen: Optional[int] = None

    @classmethod
    def governing(cls, max_steps: int, epochs: float, batch_size: int, seqlen: int) -> "Budget":
        """The budget of a ``train:`` section: ``max_steps > 0`` overrides ``epochs``."""
        by_steps = max_steps > 0
        return cls(steps=max_steps if by_steps else None, epochs=None if by_steps else epochs,
                   batch_size=batch_size, seqlen=seqlen)


@dataclass
class TrainingData(_Record):
    """The fine-tuning set every method trained on."""

    examples: int = 0
    tokens: int = 0


@dataclass
class Timings:
    """Seconds per stage: wall clock and process CPU time (CPU time tells a busy machine from a slow stage)."""

    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    total: Optional[float] = None


@dataclass
class ModelResult:
    """What the run measured on one model (``dense``, ``pruned`` or a method's merged model); a stage
    returns one and :meth:`RunResults.add` files it into the sections."""

    name: str
    perplexity: dict[str, float] = field(default_factory=dict)
    zero_shot: Optional[dict[str, float]] = None
    sparsity: Optional[dict] = None
    verified: Optional[Verification] = None
    training: Optional[dict] = None
    export: Optional[str] = None


@dataclass
class RunResults:
    """Everything a run measured (see the module docstring for the dict form, ``report.json``).

    Optional fields left at None are absent from the dict. ``report_files``: the paths the report was written
    to (filled once it is written, so never in ``report.json`` itself).
    """

    name: Optional[str] = None
    model: Optional[str] = None
    output_dir: Optional[str] = None
    recipe: Optional[dict] = None
    perplexity: dict[str, dict[str, float]] = field(default_factory=dict)
    datasets: dict[str, EvalSet] = field(default_factory=dict)
    training: dict[str, dict] = field(default_factory=dict)
    sparsity: dict[str, dict] = field(default_factory=dict)
    verified: dict[str, Verification] = field(default_factory=dict)
    export: dict[str, str] = field(default_factory=dict)
    zero_shot: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: Timings = field(default_factory=Timings)
    environment: Optional[dict] = None
    budget: Optional[Budget] = None
    pruning: Optional[dict] = None
    data: Optional[TrainingData] = None
    report_files: dict[str, str] = field(default_factory=dict)
    plots_skipped: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, result: ModelResult) -> None:
        """File what was measured on one model into the sections."""
        for dataset, value in result.perplexity.items():
            self.perplexity.setdefault(dataset, {})[result.name] = value
        if result.zero_shot:
            self.zero_shot[result.name] = result.zero_shot
        sections = {"sparsity": result.sparsity, "verified": result.verified, "training": result.training,
                    "export": result.export}
        for section, value in sections.items():
            if value is not None:
                getattr(self, section)[result.name] = value

    def to_dict(self) -> dict:
        """The JSON form (``report.json`` without its ``table``)."""
        head = {"name": self.name, "model": self.model, "output_dir": self.output_dir, "recipe": self.recipe}
        tail = {"environment": self.environment, "budget": _as_dict(self.budget), "pruning": self.pruning,
                "data": _as_dict(self.data), "seconds": self.timings.total, "report": self.report_files or None,
                "plots_skipped": self.plots_skipped}
        return {
            **{k: v for k, v in head.items() if v is not None},
            "perplexity": self.perplexity,
            "datasets": {k: v.to_dict() for k, v in self.datasets.items()},
            "training": self.training,
            "sparsity": self.sparsity,
            "verified": {k: v.to_dict() for k, v in self.verified.items()},
            "export": self.export,
            "zero_shot": self.zero_shot,
            "timings": self.timings.wall,
            "cpu_seconds": self.timings.cpu,
            **{k: v for k, v in tail.items() if v is not None},
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "RunResults":
        """A :class:`RunResults` of a dict in the form of :meth:`to_dict` (any section may be missing)."""
        data = dict(data)
        take = lambda key, default=None: data.pop(key, default)  # noqa: E731
        results = cls(name=take("name"), model=take("model"), output_dir=take("output_dir"), recipe=take("recipe"))
        results.perplexity = take("perplexity") or {}
        results.datasets = {k: EvalSet.from_dict(v) for k, v in (take("datasets") or {}).items()}
        results.training = take("training") or {}
        results.sparsity = take("sparsity") or {}
        results.verified = {k: Verification.from_dict(v) for k, v in (take("verified") or {}).items()}
        results.export = take("export") or {}
        results.zero_shot = take("zero_shot") or {}
        results.timings = Timings(take("timings") or {}, take("cpu_seconds") or {}, take("seconds"))
        results.environment, results.pruning = take("environment"), take("pruning")
        budget, training_data = take("budget"), take("data")
        results.budget = Budget.from_dict(budget) if budget else None
        results.data = TrainingData.from_dict(training_data) if training_data else None
        results.report_files = take("report") or {}
        results.plots_skipped = take("plots_skipped")
        results.extra = data
        return results


def _as_dict(record: Optional[_Record]) -> Optional[dict]:
    return None if record is None else record.to_dict()


def as_results(results: Union[RunResults, Mapping]) -> RunResults:
    """``results`` as a :class:`RunResults` (a dict, e.g. a ``report.json`` read back, is converted)."""
    return results if isinstance(results, RunResults) else RunResults.from_dict(results)
