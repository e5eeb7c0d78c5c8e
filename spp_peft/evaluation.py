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
from tqdm.auto import tqdm

from spp_peft.data import token_stream


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


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

    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    total_tokens = 0
    try:
        for start in tqdm(
            range(0, ids.shape[0], batch_size), desc="perplexity", unit="batch", disable=not show_progress
        ):
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
