"""The run report: ``report.json`` (everything measured), ``report.md`` (tables + plots) and PNG plots.

The input is the :class:`~spp_peft.results.RunResults` the pipeline returns (:func:`spp_peft.pipeline.run`);
every function here also takes a dict of the same form (:meth:`RunResults.to_dict`), such as a
``report.json`` read back from disk. Plots need matplotlib (the ``plots`` extra); without it the report is
written without them and says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from spp_peft._utils import atomic_write_file
from spp_peft.results import RunResults, as_results

logger = logging.getLogger(__name__)

#: Order of the models in tables and plots: the references first, then the methods as run.
REFERENCE_MODELS = ("dense", "pruned")
METHOD_LABELS = {
    "dense": "dense",
    "pruned": "pruned",
    "spp": "SPP",
    "lora_star": "LoRA*",
    "masked_lora": "masked LoRA",
    "none": "none (pruned)",
}


#: What the functions below take: the pipeline's results, or the same as a dict (``report.json``).
Results = Union[RunResults, Mapping[str, Any]]


def label(name: str) -> str:
    method, _, base = name.rpartition("_")
    if method and base in ("4bit", "8bit"):  # a method trained on a quantized base (pipeline: f"{method}_{kind}")
        return f"{label(method)} on {base[0]}-bit base"
    return METHOD_LABELS.get(name, name)


def model_order(results: Results) -> list[str]:
    """Models that have any perplexity, references first."""
    seen: list[str] = []
    for table in as_results(results).perplexity.values():
        for name in table:
            if name not in seen:
                seen.append(name)
    refs = [m for m in REFERENCE_MODELS if m in seen]
    return refs + [m for m in seen if m not in REFERENCE_MODELS]


def recovered(results: Results, dataset: str, model: str) -> Optional[float]:
    """Share of the loss increase caused by pruning that ``model`` won back on ``dataset``.

    ``(log ppl_pruned - log ppl_model) / (log ppl_pruned - log ppl_dense)``: 1 = back to dense, 0 = no better
    than the pruned model, negative = worse. ``None`` without dense and pruned numbers.
    """
    table = as_results(results).perplexity.get(dataset, {})
    try:
        dense, pruned, value = (math.log(table[k]) for k in ("dense", "pruned", model))
    except (KeyError, ValueError, TypeError):
        return None
    gap = pruned - dense
    if gap <= 0:
        return None
    return (pruned - value) / gap


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}f}"
    return str(value)


def _sparsity_of(results: RunResults, model: str) -> Optional[float]:
    report = results.sparsity.get(model)
    if not report:
        return None
    return report.get("total_sparsity")


def result_rows(results: Results) -> list[dict]:
    """One row per model: perplexity per dataset, recovery, sparsity, verification, training time."""
    results = as_results(results)
    datasets = list(results.perplexity)
    rows = []
    for model in model_order(results):
        row = {"model": model, "label": label(model)}
        for ds in datasets:
            row[f"ppl:{ds}"] = results.perplexity[ds].get(model)
            row[f"recovered:{ds}"] = recovered(results, ds, model) if model not in REFERENCE_MODELS else None
        row["sparsity"] = _sparsity_of(results, model)
        verified = results.verified.get(model)
        row["verified"] = None if verified is None else bool(verified.ok)
        training = results.training.get(model) or {}
        row["train_seconds"] = training.get("seconds")
        row["resumed"] = bool(training.get("resumed_from"))
        row["lr"] = training.get("lr")
        rows.append(row)
    return rows


def format_table(results: Results, markdown: bool = False) -> str:
    """The result table as plain text (for the console) or Markdown."""
    results = as_results(results)
    datasets = list(results.perplexity)
    headers = ["model"] + [f"ppl {ds}" for ds in datasets] + [f"recovered {ds}" for ds in datasets] + [
        "sparsity", "zeros kept", "lr", "train s"]
    body = []
    for row in result_rows(results):
        cells = [row["label"]]
        cells += [_fmt(row[f"ppl:{ds}"]) for ds in datasets]
        cells += ["-" if row[f"recovered:{ds}"] is None else f"{row[f'recovered:{ds}']:.0%}" for ds in datasets]
        cells.append("-" if row["sparsity"] is None else f"{row['sparsity']:.2%}")
        cells.append({None: "-", True: "yes", False: "NO"}[row["verified"]])
        cells.append("-" if row["lr"] is None else f"{row['lr']:g}")
        cells.append(_fmt(row["train_seconds"], 0) + (" (resumed)" if row["resumed"] else ""))
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


# ------------------------------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_losses(results: Results, path: Union[str, os.PathLike]) -> Optional[Path]:
    """Training loss per step, one line per method."""
    plt = _pyplot()
    training = as_results(results).training
    curves = {m: t.get("losses") for m, t in training.items() if t and t.get("losses")}
    if plt is None or not curves:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for method, losses in curves.items():
        steps, values = zip(*losses)
        lr = training[method].get("lr")
        ax.plot(steps, values, marker="o", markersize=3, label=f"{label(method)} (lr {lr:g})" if lr else label(method))
    ax.set_xlabel("optimizer step")
    return _finish(plt, fig, ax, path, "training loss", "Training loss (same data and budget for every method)")


def plot_perplexity(results: Results, path: Union[str, os.PathLike]) -> Optional[Path]:
    """Grouped bars: perplexity of every model on every evaluation set."""
    plt = _pyplot()
    table = as_results(results).perplexity
    if plt is None or not table:
        return None
    models = model_order(results)
    datasets = list(table)
    width = 0.8 / max(1, len(datasets))
    fig, ax = plt.subplots(figsize=(1.4 + 1.3 * len(models), 4.0))
    for j, ds in enumerate(datasets):
        xs = [i + (j - (len(datasets) - 1) / 2) * width for i in range(len(models))]
        values = [table[ds].get(m, float("nan")) for m in models]
        bars = ax.bar(xs, values, width=width, label=ds)
        for bar, v in zip(bars, values):
            if v == v:  # not NaN
                ax.annotate(f"{v:.1f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([label(m) for m in models])
    ax.set_ylim(bottom=0)
    return _finish(plt, fig, ax, path, "perplexity (lower is better)", "Perplexity", grid_axis="y",
                   legend_title="evaluation set")


def plot_sparsity(results: Results, path: Union[str, os.PathLike]) -> Optional[Path]:
    """Per-layer sparsity of the pruned base (before) and of every merged model (after)."""
    plt = _pyplot()
    reports = as_results(results).sparsity
    if plt is None or "pruned" not in reports:
        return None
    names = [layer["name"] for layer in reports["pruned"]["layers"]]
    fig, ax = plt.subplots(figsize=(max(6.4, len(names) * 0.03 + 4), 4.0))
    styles = {"pruned": dict(linewidth=3, alpha=0.5, color="gray")}
    for model, report in reports.items():
        if model == "dense":
            continue
        by_name = {layer["name"]: layer["sparsity"] for layer in report["layers"]}
        values = [by_name.get(n, float("nan")) for n in names]
        marker = dict(marker="x", linestyle="none", markersize=4) if model != "pruned" else {}
        ax.plot(range(len(names)), values, label=f"{label(model)}{' (before)' if model == 'pruned' else ' (after merge)'}",
                **styles.get(model, {}), **marker)
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylim(0, 1)
    return _finish(plt, fig, ax, path, "sparsity", "Per-layer sparsity before fine-tuning and after merging")


def _finish(plt, fig, ax, path: Union[str, os.PathLike], ylabel: str, title: str, grid_axis: str = "both",
            legend_title: Optional[str] = None) -> Path:
    """Label, grid and legend shared by every plot, then write the figure."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis=grid_axis, alpha=0.3)
    ax.legend(title=legend_title)
    fig.tight_layout()
    try:
        # The temporary name has no .png suffix: say the format.
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ writing


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def markdown(results: Results, plots: dict[str, str]) -> str:
    """The text of ``report.md``."""
    results = as_results(results)
    lines = [f"# spp-peft run: {results.name or 'run'}", ""] + _summary(results)
    lines += ["", "## Results", "", format_table(results, markdown=True), "",
              "`recovered`: share of the loss increase caused by pruning that fine-tuning won back "
              "(log-perplexity; 100% = dense). `zeros kept`: the merged model's zero set equals the pruned "
              "base's, checked weight by weight.", ""]
    if results.verified:
        lines += ["## Sparsity verification", ""]
        for method, v in results.verified.items():
            lines.append(f"- {label(method)}: {'OK' if v.ok else 'FAILED'}: {v.message}")
        lines.append("")
    if results.export:
        lines += ["## Exported models", ""]
        lines += [f"- {label(m)}: `{p}`" for m, p in results.export.items()]
        lines.append("")
    zero_shot = results.zero_shot
    if zero_shot:
        tasks = sorted({t for scores in zero_shot.values() for t in scores})
        lines += ["## Zero-shot accuracy (lm-eval)", "", "| model | " + " | ".join(tasks) + " |",
                  "|---|" + "---|" * len(tasks)]
        for model, scores in zero_shot.items():
            lines.append(f"| {label(model)} | " + " | ".join(_fmt(scores.get(t), 4) for t in tasks) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""]
        titles = {"loss": "Training loss", "perplexity": "Perplexity", "sparsity": "Per-layer sparsity"}
        for key, rel in plots.items():
            lines += [f"### {titles.get(key, key)}", "", f"![{key}]({rel})", ""]
    elif results.plots_skipped:
        lines += [f"_Plots skipped: {results.plots_skipped}_", ""]
    timings = results.timings.wall
    if timings:
        lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
        lines.append("")
    return "\n".join(lines)


def _summary(results: RunResults) -> list[str]:
    """The bullet points at the top of ``report.md``: what was pruned, trained and evaluated, and how long."""
    lines = []
    pruning = results.pruning or {}
    if pruning:
        what = pruning.get("pattern") if pruning.get("pattern") not in (None, "unstructured") else \
            f"{pruning.get('sparsity', 0):.0%} unstructured"
        calib = pruning.get("calibration") or {}
        lines.append(f"- model: `{results.model}`; pruned with **{pruning.get('method')}** ({what})"
                     + (f", calibration {calib.get('nsamples')} x {calib.get('seqlen')} tokens of "
                        f"`{calib.get('source')}`" if calib else ""))
    if results.training:
        any_t = next(iter(results.training.values()))
        budget = results.budget
        lines.append(f"- fine-tuning budget, identical for every method: {any_t.get('steps')} steps"
                     + (f" of {budget.batch_size} x {budget.seqlen} tokens" if budget else "")
                     + f" ({any_t.get('tokens'):,} tokens)")
    for ds, info in results.datasets.items():
        lines.append(f"- evaluation set `{ds}`: `{info.source}`, {info.tokens:,} tokens")
    if results.timings.total is not None:
        lines.append(f"- total run time: {results.timings.total / 60:.1f} min")
    return lines


def write_report(results: Results, out_dir: Union[str, os.PathLike], plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (``plots``) ``plots/*.png`` into ``out_dir``.

    Returns the paths written, by kind (``json``, ``md``, ``loss``, ``perplexity``, ``sparsity``).
    """
    out = Path(out_dir)
    written: dict[str, Path] = {}
    rel_plots: dict[str, str] = {}
    results = as_results(results)
    if plots:
        if _pyplot() is None:
            skipped = "matplotlib is not installed (pip install 'spp-peft[plots]')"
            results = dataclasses.replace(results, plots_skipped=skipped)
        else:
            for key, fn in (("loss", plot_losses), ("perplexity", plot_perplexity), ("sparsity", plot_sparsity)):
                path = fn(results, out / "plots" / f"{key}.png")
                if path is not None:
                    written[key] = path
                    rel_plots[key] = f"plots/{key}.png"
    data = {**results.to_dict(), "table": result_rows(results)}
    # One atomic file each (plots, then json, then md): a crash leaves each file whole, old or new.
    written["json"] = atomic_write_file(out / "report.json",
                                        json.dumps(data, indent=1, default=_json_default) + "\n")
    written["md"] = atomic_write_file(out / "report.md", markdown(results, rel_plots))
    logger.info("report written to %s", written["md"])
    return written


def read_report(path: Union[str, os.PathLike]) -> dict:
    """A ``report.json`` (or the folder holding one) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    return json.loads(path.read_text(encoding="utf-8"))
