"""scipy.stats and scipy.special's functions, imported when a statistic first needs them, not with the report's
modules.

Importing scipy.stats takes most of a second; the report needs it only for exact small-sample tests and
Kolmogorov–Smirnov (consumers.report.special_stats), and imports it on first use. The special functions the report
calls (`special`) are scipy.special's compiled ufuncs, imported without scipy.special's own __init__
(`import_special_functions`). `import_in_background` starts imports in a thread, so that they overlap work that waits
(the report's database read); Python's import lock makes two imports of one module one: whichever thread comes second
waits for the first.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

SPECIAL_FUNCTIONS = "scipy.special._ufuncs"
_SPECIAL_PACKAGE = threading.Lock()  # one import_special_functions at a time stands in for scipy.special


def import_special_functions() -> ModuleType:
    """scipy.special._ufuncs, the compiled module every special function the report calls comes from (the same
    objects scipy.special exports), imported without running scipy.special's __init__, which wraps every function for
    other array libraries: after numpy, scipy.special's import took 0.100-0.135 s here, this one 0.010-0.013 s.
    Meanwhile a bare package module stands for scipy.special in sys.modules; it is removed afterwards, so a later
    `import scipy.special` (scipy.stats does one) runs the real one, which finds these functions already loaded. The
    imports made here (`stats`, `import_in_background`) wait for it; an import of scipy.special in another thread by
    other code meanwhile would be given the bare package."""
    with _SPECIAL_PACKAGE:
        if "scipy.special" in sys.modules:
            return importlib.import_module(SPECIAL_FUNCTIONS)
        bare = importlib.util.module_from_spec(importlib.util.find_spec("scipy.special"))  # __init__ not run
        sys.modules["scipy.special"] = bare
        try:
            return importlib.import_module(SPECIAL_FUNCTIONS)
        finally:
            if sys.modules.get("scipy.special") is bare:
                del sys.modules["scipy.special"]


def _import(name: str) -> ModuleType:
    if name == SPECIAL_FUNCTIONS:
        return import_special_functions()
    if name.startswith("scipy."):  # it imports scipy.special: never while a bare package stands in for it
        with _SPECIAL_PACKAGE:
            return importlib.import_module(name)
    return importlib.import_module(name)


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
special = _Lazy(SPECIAL_FUNCTIONS)
