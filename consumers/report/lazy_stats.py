"""scipy.stats (and scipy.special), imported when a statistic first needs it, not with the report's modules.

Importing scipy.stats takes most of a second; the report needs it only for exact small-sample tests and
Kolmogorov–Smirnov (consumers.report.special_stats), and imports it on first use. `import_in_background` starts
imports in a thread, so that they overlap work that waits (the report's database read); Python's import lock makes
two imports of one module one: whichever thread comes second waits for the first.
"""

from __future__ import annotations

import importlib
import sys
import threading
from types import ModuleType

# scipy.special imports scipy's copy of array_api_compat, which clones numpy's namespace (`from numpy import *`, then
# every name dir(numpy) lists): numpy's submodules that load on first access are imported too, these two among them.
# They took about 0.05 s of the 0.11 s scipy.special's import took, and nothing the report runs uses them.
UNUSED_NUMPY = ("f2py", "testing")
_NUMPY_NAMES = threading.Lock()  # one import_scipy_special at a time changes numpy's names and puts them back


def import_scipy_special() -> ModuleType:
    """scipy.special, imported without importing the numpy submodules UNUSED_NUMPY: numpy.__all__ and dir(numpy)
    leave them out meanwhile. Where scipy.special is imported already, or numpy lists its names otherwise, simply
    imported."""
    import numpy

    with _NUMPY_NAMES:
        listed, names = numpy.__dict__.get("__dir__"), numpy.__dict__.get("__all__")
        if listed is None or not isinstance(names, list) or "scipy.special" in sys.modules:
            return importlib.import_module("scipy.special")
        numpy.__dir__ = lambda: [name for name in listed() if name not in UNUSED_NUMPY]
        numpy.__all__ = [name for name in names if name not in UNUSED_NUMPY]
        try:
            return importlib.import_module("scipy.special")
        finally:
            numpy.__dir__, numpy.__all__ = listed, names


def _import(name: str) -> ModuleType:
    return import_scipy_special() if name == "scipy.special" else importlib.import_module(name)


def import_in_background(*names: str) -> threading.Thread:
    """Start importing the modules `names`, in order, in a daemon thread; join it before the process ends (a module
    torn down half-imported at exit can fail)."""
    thread = threading.Thread(target=lambda: [_import(name) for name in names],
                              name="import-" + ",".join(names), daemon=True)
    thread.start()
    return thread


class _Lazy:
    """Stands for a module: its attributes are the module's, imported on first access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, name: str):
        module = self._module
        if module is None:
            module = self._module = _import(self._name)
        return getattr(module, name)


stats = _Lazy("scipy.stats")
special = _Lazy("scipy.special")
