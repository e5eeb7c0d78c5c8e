"""Opt-in start-up hook: SPP adapters load in any tool (lm-eval, ``AutoPeftModelForCausalLM``, ``pipeline``)
without an ``import spp_peft`` in that tool's code.

PEFT and transformers have no plugin discovery: a tool that loads an SPP adapter without importing spp-peft
fails with ``KeyError: 'SPP'``. ``spp-peft autoload enable`` writes one small ``.pth`` file into the active
environment's site-packages. Python runs its single line at start-up; it imports the (light) ``spp_peft``
package, which registers SPP with PEFT right after PEFT finishes importing, and never imports torch or PEFT
itself (see :mod:`spp_peft._hooks`). Any failure becomes one warning, never a broken interpreter.
``spp-peft autoload disable`` removes the file; ``status`` says whether it is there.
"""

from __future__ import annotations

import os
import site
import sysconfig
from pathlib import Path
from typing import Optional

PTH_NAME = "spp_peft_autoload.pth"
# One line, as .pth files require; it must start with "import" to be executed. importlib.util.find_spec keeps an
# uninstalled spp-peft from producing an error, and the try turns any other failure into one warning.
PTH_LINE = (
    "import importlib.util as _u; exec(\"try:\\n if _u.find_spec('spp_peft'): import spp_peft\\n"
    "except Exception as _e:\\n import warnings; warnings.warn('spp-peft autoload: %s' % (_e,))\")\n"
)


def site_dir(target: Optional[os.PathLike] = None) -> Path:
    """Where the ``.pth`` goes: ``target`` or this environment's site-packages (purelib)."""
    return Path(target) if target is not None else Path(sysconfig.get_paths()["purelib"])


def pth_path(target: Optional[os.PathLike] = None) -> Path:
    return site_dir(target) / PTH_NAME


def enable(target: Optional[os.PathLike] = None) -> Path:
    """Write the start-up hook (atomically; idempotent). Returns its path."""
    from ._utils.atomic import atomic_write_file

    path = pth_path(target)
    atomic_write_file(path, PTH_LINE)
    return path


def disable(target: Optional[os.PathLike] = None) -> bool:
    """Remove the start-up hook; True if there was one."""
    path = pth_path(target)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def status(target: Optional[os.PathLike] = None) -> str:
    """One line: whether the hook is enabled, and where."""
    path = pth_path(target)
    if not path.is_file():
        return f"autoload: disabled (no {PTH_NAME} in {path.parent})"
    current = path.read_text(encoding="utf-8") == PTH_LINE
    state = "enabled" if current else "enabled, but written by another spp-peft version (run enable again)"
    return f"autoload: {state} ({path})"


def user_site_note() -> str:
    """Hint for environments where site-packages is not writable."""
    return f"if site-packages is not writable, use --target {site.getusersitepackages()}"
