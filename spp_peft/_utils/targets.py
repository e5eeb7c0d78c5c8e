"""Which module names a ``target_modules`` value selects: PEFT's rule, in one place."""

from __future__ import annotations

import re
from typing import Iterable, Optional, Union


def matches_target(name: str, targets: Optional[Union[str, Iterable[str]]]) -> bool:
    """PEFT's semantics (``peft.tuners.tuners_utils.check_target_module_exists``): a string is a regular
    expression that must match the whole name; a list names modules by their full name or their last dotted
    components (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``); ``None`` matches everything.

    Raises:
        ValueError: an invalid regular expression (named in the message).
    """
    if targets is None:
        return True
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, name) is not None
        except re.error as err:
            raise ValueError(f"target_modules regex {targets[:80]!r} is invalid: {err}") from None
    return any(name == key or name.endswith("." + key) for key in targets)
