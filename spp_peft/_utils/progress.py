"""Progress bars that obey the global switches: ``TQDM_DISABLE=1`` and transformers'
``disable_progress_bar()`` (what ``spp-peft -q`` calls), as the bars of transformers and datasets do.

A bar is never built with an explicit ``disable=False``: tqdm reads ``TQDM_*`` variables only for the
arguments a caller leaves out, so an explicit value would override the user's switch.
"""

from __future__ import annotations

import sys
from typing import Iterable


def progress_enabled() -> bool:
    """False once transformers' progress bars were switched off (``disable_progress_bar()``,
    ``HF_HUB_DISABLE_PROGRESS_BARS``); transformers is asked only if it is already imported."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    return hf_logging is None or bool(hf_logging.is_progress_bar_enabled())


def progress(iterable: Iterable, show: bool = True, **kwargs):
    """``tqdm(iterable, **kwargs)`` when ``show`` and the global switches allow it, else a silent one."""
    from tqdm.auto import tqdm

    if not (show and progress_enabled()):
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
