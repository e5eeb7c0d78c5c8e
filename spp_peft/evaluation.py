"""Evaluation of (pruned, adapted) causal LMs.

:func:`perplexity` follows the WikiText-2 protocol of the SparseGPT and Wanda papers: the documents are
joined with blank lines, tokenized once, cut into non-overlapping windows of ``seqlen`` tokens (the
remainder is dropped), and the perplexity is ``exp`` of the mean next-token negative log-likelihood over
all predicted tokens. (The references multiply each window's mean loss by ``seqlen`` although only
``seqlen - 1`` tokens are predicted; here the exact token count is used, which differs negligibly.)
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from spp_peft._utils.progress import progress
from spp_peft._utils.tensors import model_device
from spp_peft.data import token_stream


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer_or_ids,
    texts: Optional[Union[str, Sequence[str]]] = None,
    seqlen: int = 256,
    batch_size: int = 4,
    max_tokens: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    show_progress: bool = True,
) -> float:
    """Perplexity of ``model`` on a text, WikiText-2 style (non-overlapping windows of ``seqlen``).

    Args:
        model: a HuggingFace causal LM (or PEFT-wrapped one) returning ``.logits``.
        tokenizer_or_ids: a tokenizer (then ``texts`` is required) or pre-tokenized ids: a 1-D token stream
            or a 2-D ``(windows, seqlen)`` LongTensor.
        texts: the documents (joined by ``"\\n\\n"``) or one string, when a tokenizer is given.
        seqlen: window length in tokens (ignored for 2-D ids).
        batch_size: windows per forward pass.
        max_tokens: evaluate only the first ``max_tokens`` tokens of the stream (rounded down to windows).
        device: where to compute (default: the model's device).
        show_progress: tqdm bar over batches.

    Returns:
        the perplexity (a float >= 1).
    """
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids.long()
    else:
        if texts is None:
            raise ValueError("perplexity: pass texts= together with a tokenizer")
        ids = token_stream(tokenizer_or_ids, texts)
    if ids.dim() == 1:
        if max_tokens is not None:
            ids = ids[:max_tokens]
        windows = ids.numel() // seqlen
        if windows == 0:
            raise ValueError(f"perplexity: {ids.numel()} tokens are fewer than one window of seqlen={seqlen}")
        ids = ids[: windows * seqlen].reshape(windows, seqlen)
    elif ids.dim() != 2:
        raise ValueError(f"perplexity: ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
    if ids.shape[1] < 2:
        raise ValueError("perplexity: windows need at least 2 tokens")

    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in progress(range(0, ids.shape[0], batch_size), show_progress, desc="perplexity", unit="batch"):
            batch = ids[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            # Float64 accumulation: summing ~1e5 token losses in float32 loses digits.
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total_nll += float(nll.double())
            total_tokens += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return math.exp(total_nll / total_tokens)


# =====================================================================================================
# Zero-shot accuracy through lm-eval (optional extra: pip install 'spp-peft[eval]'). Added with the
# pipeline / CLI; the model is evaluated in memory (no save and reload), through lm-eval's HFLM.
# =====================================================================================================

#: The seven zero-shot tasks of the SPP, Wanda and SparseGPT papers (lm-eval task names).
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")


def zero_shot(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: Optional[Union[int, float]] = None,
    batch_size: int = 4,
    metric: str = "acc",
    include_path: Optional[str] = None,
    include_defaults: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> dict[str, float]:
    """Zero-shot accuracy of an in-memory model on lm-eval tasks.

    Args:
        model: a HuggingFace causal LM (e.g. the merged model; a PEFT wrapper should be merged first).
        tokenizer: its tokenizer.
        tasks: lm-eval task names, e.g. :data:`PAPER_TASKS` (their datasets come from the hub).
        limit: examples per task (``None`` = all), lm-eval's ``limit``.
        batch_size: lm-eval batch size.
        metric: the metric to return per task (``"acc"``; ``"acc_norm"`` where the task has it).
        include_path: a folder of extra task YAML files (local tasks), passed to lm-eval's ``TaskManager``.
        include_defaults: also index lm-eval's built-in tasks (slow to index; ``False`` with local tasks only).
        device: where to run (default: the model's device).

    Returns:
        ``{task: metric value}``.

    Raises:
        ImportError: with the install command, when lm-eval is missing.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError("zero-shot evaluation needs lm-eval: pip install 'spp-peft[eval]' "
                          f"(or pip install lm-eval); import failed: {err}") from err
    device = torch.device(device) if device is not None else model_device(model)
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    _check_tasks(manager, tasks)
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        out = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=0)
    finally:
        model.train(was_training)
    return _scores(out["results"], metric)


def local_tasks_only(tasks: Sequence[str], include_path: Optional[str] = None) -> bool:
    """Whether every task is a YAML file or named by a ``task:`` line of a YAML file under ``include_path``:
    then lm-eval's own task zoo (seconds to index) need not be indexed."""
    import os
    import re
    from pathlib import Path

    names: set[str] = set()
    if include_path:
        for path in Path(include_path).expanduser().rglob("*.y*ml"):
            names.update(re.findall(r"^task:\s*['\"]?([\w.\-]+)", path.read_text(errors="replace"), re.M))
    return all(os.path.isfile(t) or t in names for t in tasks)


def check_tasks(tasks: Sequence[str], include_path: Optional[str] = None) -> None:
    """Refuse unknown lm-eval task names (ValueError naming them) before any model is loaded."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=not local_tasks_only(tasks, include_path))
    _check_tasks(manager, tasks)


def _check_tasks(manager, tasks: Sequence[str]) -> None:
    """Unknown task names fail here, naming them, before a model is wrapped (lm-eval only logs them)."""
    import os

    names = [t for t in tasks if not (isinstance(t, str) and os.path.isfile(t))]
    known = set(manager.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s): {', '.join(map(repr, unknown[:5]))}; pass a task YAML file, or the folder "
            "holding your task YAMLs with include_path (--include-path)"
        )


def _scores(results: dict, metric: str) -> dict[str, float]:
    """``{task: metric}`` keyed by lm-eval's own task names (a task given as a YAML file is reported under the
    ``task:`` name inside it, not under the path)."""
    key = f"{metric},none"
    scores = {}
    for task, values in results.items():
        if key not in values:
            raise ValueError(f"lm-eval task {task!r} has no metric {metric!r} (it has: {sorted(values)})")
        scores[task] = float(values[key])
    return scores
