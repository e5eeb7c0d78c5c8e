"""Run a function once a module has finished importing, without importing it (standard library only).

``import spp_peft`` must make SPP a PEFT method, yet importing one of its light modules (``spp_peft.sparsity``,
``spp_peft.pruning``) must not pull in PEFT and the tuner. So the package registers SPP when PEFT is imported:
at once if it already is, else right after PEFT's own ``__init__`` has run. A probe such as
``importlib.util.find_spec("peft")`` imports nothing and does not fire the hook.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

# Not `from typing import ...`: importing typing costs ~2 ms in every interpreter once autoload is enabled.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable


class _AfterImport:
    """A meta path finder (duck-typed: ``importlib.abc`` costs milliseconds at start-up) that lets the normal
    finders find ``name`` and wraps its loader's ``exec_module``."""

    def __init__(self, name: str, callback: Callable[[], None]):
        self.name = name
        self.callback = callback
        self._finding = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True  # importlib.util.find_spec below consults sys.meta_path, this finder included
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module") or getattr(loader, "_spp_hooked", False):
            return spec
        exec_module = loader.exec_module

        def exec_then_fire(module):
            exec_module(module)
            self.fire()

        # An attribute on this spec's own loader instance: the loader keeps its class (isinstance checks hold).
        loader.exec_module = exec_then_fire
        loader._spp_hooked = True
        return spec

    def fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _run(self.callback)


def _run(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception as err:  # a start-up hook must never break the importing program
        warnings.warn(f"spp-peft: could not register SPP with PEFT ({type(err).__name__}: {err})", stacklevel=2)


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Call ``callback`` once ``name`` is fully imported: now if it is, else right after its import."""
    if name in sys.modules and getattr(sys.modules[name], "__spec__", None) is not None:
        _run(callback)
        return
    if not any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, callback))
