"""Text sources and token windows for calibration, training and evaluation.

Sections:
    * built-in offline text (:func:`builtin_text`, :func:`out_of_domain_text`): always available, no network;
    * generic text loading (:func:`load_texts`): built-in names, local files, hub datasets, lists of strings;
    * tokenization helpers (:func:`tokenize`, :func:`token_stream`, :func:`append_eos`);
    * calibration data (:func:`calibration_windows`), sampled like Wanda's and SparseGPT's ``get_loaders``;
    * language-model training windows (:func:`lm_windows`).

The built-in text is the documentation that ships with CPython itself: ``pydoc_data.topics.topics``, the
~465k characters of the language reference behind ``help("topic")``. It is English technical prose with
code, a reasonable stand-in for WikiText-2 when nothing can be downloaded. Its exact content depends on the
Python version, so numbers measured on it are comparable only on the same Python minor version.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

#: Every ``HELDOUT_EVERY``-th topic (sorted by name, starting with the first) is held out for evaluation.
#: 1 in 5 (16 of the 78 distinct topics on Python 3.11, ~69k characters, ~17k SmolLM2 tokens) gives a perplexity that is
#: stable to a few tenths; 1 in 10 would leave too few tokens.
HELDOUT_EVERY = 5
BUILTIN_SPLITS = ("train", "heldout")
#: Where the out-of-domain text is looked for, in order (see :func:`out_of_domain_text`).
GPL3_PATHS = ("/usr/share/common-licenses/GPL-3", "/usr/share/licenses/common/GPL3/license.txt")
# Paragraph separator used to join documents, the WikiText-2 convention of Wanda / SparseGPT.
DOC_SEPARATOR = "\n\n"

TextSource = Union[str, os.PathLike, Sequence[str]]


# ------------------------------------------------------------------------------------ built-in text


def _builtin_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    # dict order is an implementation detail of how the file was generated: sort for determinism.
    # Some topics are aliases with the very same text ("if" and "else"): keep the first only, or a held-out
    # document could also sit in the training split.
    seen: set[str] = set()
    unique = []
    for key in sorted(topics):
        if topics[key] not in seen:
            seen.add(topics[key])
            unique.append((key, topics[key]))
    return unique


def builtin_text(split: str = "train") -> list[str]:
    """The built-in offline corpus, one document per pydoc topic.

    Args:
        split: ``"train"`` (4 of every 5 topics, for calibration and fine-tuning) or ``"heldout"`` (every
            5th topic, for evaluation). Topics are sorted by name and de-duplicated (aliases such as
            "if"/"else" share one text). The split is by topic, so no held-out paragraph is ever seen in
            calibration or training.

    Returns:
        the documents of the split, in sorted topic order.
    """
    return [text for _, text in split_topics(split, "builtin_text")]


def split_topics(split: str, caller: str) -> list[tuple[str, str]]:
    """``(topic, text)`` of the built-in corpus's ``split`` (every ``HELDOUT_EVERY``-th topic is held out)."""
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"{caller}: split must be one of {BUILTIN_SPLITS}, got {split!r}")
    heldout = split == "heldout"
    return [topic for i, topic in enumerate(_builtin_topics()) if (i % HELDOUT_EVERY == 0) == heldout]


def out_of_domain_text() -> list[str]:
    """A second held-out text, unlike the training domain: the GNU GPL v3 license.

    It is read from the system copy (Debian/Ubuntu ``/usr/share/common-licenses/GPL-3``, Arch's licenses
    folder). Where none exists the fallback is the CPython license (``LICENSE.txt`` of the standard library),
    which is also legal prose; :func:`out_of_domain_source` says which one was used, so reports can name it.
    Paragraphs (blank-line separated) are returned as documents.
    """
    path = out_of_domain_source()
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in text.split(DOC_SEPARATOR) if p.strip()]


def out_of_domain_source() -> str:
    """Path of the file :func:`out_of_domain_text` reads (GPL-3 if present, else the Python license)."""
    for candidate in GPL3_PATHS:
        if os.path.isfile(candidate):
            return candidate
    fallback = os.path.join(sysconfig.get_paths()["stdlib"], "LICENSE.txt")
    if os.path.isfile(fallback):
        return fallback
    raise FileNotFoundError(
        f"no out-of-domain text found: looked for {', '.join(GPL3_PATHS)} and {fallback}"
    )


# ------------------------------------------------------------------------------------ text loading


def _load_local_file(path: Path, text_field: str) -> list[str]:
    from datasets import load_dataset

    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".md"):
        # sample_by="paragraph" splits on blank lines, so joining with DOC_SEPARATOR restores the file.
        dataset = load_dataset("text", data_files=str(path), split="train", sample_by="paragraph")
        return [t for t in dataset["text"] if t.strip()]
    if suffix in (".json", ".jsonl"):
        dataset = load_dataset("json", data_files=str(path), split="train")
        if text_field not in dataset.column_names:
            raise ValueError(
                f"{path}: no {text_field!r} field in the JSON records (fields: {dataset.column_names}); "
                "pass text_field= to choose one"
            )
        return [str(t) for t in dataset[text_field] if t is not None and str(t).strip()]
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .txt, .json or .jsonl")


def hub_dataset_id(source: str) -> tuple[str, Optional[str], str]:
    """``(name, config, split)`` of a hub dataset source ``"name[:config][:split]"`` (split ``train`` by default)."""
    parts = source.split(":")
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return parts[0], config, split


def _load_hub(source: str, text_field: str) -> list[str]:
    from datasets import load_dataset

    if source.count(":") > 2:
        raise ValueError(f"hub dataset must look like 'name[:config][:split]', got {source!r}")
    name, config, split = hub_dataset_id(source)
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as err:  # datasets raises many types (ConnectionError, DatasetNotFoundError, ...)
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: the hub cannot be reached)" if offline else ""
        raise RuntimeError(
            f"could not load hub dataset {name!r} (config={config!r}, split={split!r}){hint}: {err}. "
            "Offline, use 'builtin', 'builtin:heldout', or a local .txt/.json/.jsonl file."
        ) from err
    if text_field not in dataset.column_names:
        raise ValueError(f"hub dataset {name!r} has no {text_field!r} column (columns: {dataset.column_names})")
    return [str(t) for t in dataset[text_field] if t is not None and str(t).strip()]


def load_texts(source: TextSource, text_field: str = "text") -> list[str]:
    """Load a list of documents from any supported source.

    Args:
        source: one of
            * ``"builtin"`` / ``"builtin:train"`` / ``"builtin:heldout"``: the built-in pydoc corpus;
            * ``"builtin:ood"``: the out-of-domain held-out text (:func:`out_of_domain_text`);
            * a local ``.txt`` (paragraphs = documents), ``.json`` or ``.jsonl`` file;
            * a hub dataset ``"name[:config][:split]"`` (e.g. ``"wikitext:wikitext-2-raw-v1:test"``),
              which needs network access;
            * a list of strings, returned as a list.
        text_field: the field holding the text in JSON files and hub datasets.

    Returns:
        the non-empty documents.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise TypeError("load_texts: a list source must contain only strings")
        return list(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"load_texts: unsupported source type {type(source).__name__}")
    name = os.fspath(source)
    if name == "builtin" or name.startswith("builtin:"):
        split = name.partition(":")[2] or "train"
        if split == "ood":
            return out_of_domain_text()
        return builtin_text(split)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_local_file(path, text_field)
    if path.is_dir():
        raise ValueError(f"load_texts: {name!r} is a folder; pass a .txt, .json or .jsonl file")
    # "org/name" is a hub id, but a path-looking name or a text-file suffix is a missing local file.
    if path.suffix.lower() in (".txt", ".text", ".md", ".json", ".jsonl") or name.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"load_texts: file {name!r} does not exist")
    return _load_hub(name, text_field)


# ------------------------------------------------------------------------------------ tokenization


def eos_token_id(tokenizer, fmt: str) -> int:
    """The tokenizer's EOS token id, which ``add_eos`` appends; a clear refusal when there is none."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"data.add_eos: the tokenizer has no EOS token to end the {fmt!r} examples with; "
                         "set add_eos to false")
    return int(eos)


def append_eos(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each document ending with the tokenizer's EOS token (appended where it does not already), as TRL's
    ``SFTTrainer`` ends language-modelling texts: the model learns where a document stops."""
    eos_token_id(tokenizer, "text")
    eos = tokenizer.eos_token
    return [text if text.endswith(eos) else text + eos for text in texts]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D LongTensor, without special tokens.

    Special tokens are left out so that windows cut from the stream are plain text everywhere (a BOS
    token in the middle of a calibration window would be an artefact of where documents were joined).
    """
    if callable(tokenizer) and hasattr(tokenizer, "model_max_length"):
        # verbose=False: the stream is longer than the model's context by design; it is cut into windows.
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    elif hasattr(tokenizer, "encode"):
        ids = tokenizer.encode(text)
    else:
        raise TypeError(f"tokenize: {type(tokenizer).__name__} is neither a HF tokenizer nor has .encode()")
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def token_stream(tokenizer, texts: Union[str, Sequence[str]]) -> torch.Tensor:
    """The documents joined by blank lines (the WikiText-2 protocol) and tokenized: a 1-D LongTensor."""
    joined = texts if isinstance(texts, str) else DOC_SEPARATOR.join(texts)
    return tokenize(tokenizer, joined)


def calibration_windows(
    tokenizer,
    texts: Union[str, Sequence[str]],
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
) -> torch.Tensor:
    """Random token windows for pruning calibration, as in Wanda's and SparseGPT's ``get_loaders``.

    The documents are joined into one token stream and ``nsamples`` windows of ``seqlen`` tokens are cut
    at uniformly random offsets drawn from a seeded ``torch.Generator`` (same seed, same windows, on any
    machine). Windows may overlap, as in the references.

    Args:
        tokenizer: a HuggingFace tokenizer (or any object with ``encode``).
        texts: documents (see :func:`load_texts`) or one string.
        nsamples: number of windows (Wanda / SparseGPT use 128).
        seqlen: tokens per window (2048 in the papers; smaller for small models and CPUs).
        seed: sampling seed.

    Returns:
        a ``(nsamples, seqlen)`` LongTensor.

    Raises:
        ValueError: when the text holds fewer than ``seqlen + 1`` tokens or the sizes are not positive.
    """
    if nsamples <= 0 or seqlen <= 0:
        raise ValueError(f"calibration_windows: nsamples and seqlen must be positive, got {nsamples}, {seqlen}")
    stream = token_stream(tokenizer, texts)
    if stream.numel() <= seqlen:
        raise ValueError(
            f"calibration_windows: the calibration text has {stream.numel()} tokens, fewer than "
            f"seqlen + 1 = {seqlen + 1}; use more text or a shorter seqlen"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([stream[s : s + seqlen] for s in starts.tolist()])


def lm_windows(tokenizer, texts: Union[str, Sequence[str]], seqlen: int) -> torch.Tensor:
    """Non-overlapping ``seqlen``-token windows of the joined documents, for language-model training.

    The stream is :func:`token_stream` (documents joined by blank lines); the remainder shorter than a
    window is dropped. Returns a ``(windows, seqlen)`` LongTensor.
    """
    if seqlen <= 1:
        raise ValueError(f"lm_windows: seqlen must be > 1, got {seqlen}")
    stream = token_stream(tokenizer, texts)
    count = stream.numel() // seqlen
    if count == 0:
        raise ValueError(f"lm_windows: the text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    return stream[: count * seqlen].reshape(count, seqlen)
