"""scipy.stats (and scipy.special), imported when a statistic first needs it, not with the report's modules.

Importing scipy.stats takes most of a second; the report needs it only for exact small-sample tests and
Kolmogorov–Smirnov (consumers.report.special_stats), and imports it on first use. `import_in_background` starts
imports in a thread, so that they overlap work that waits (the report's database read); Python's import lock makes
two imports of one module one: whichever thread comes second waits for the first.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType


def import_in_background(*names: str) -> threading.Thread:
    """Start importing the modules `names`, in order, in a daemon thread; join it before the process ends (a module
    torn down half-imported at exit can fail)."""
    thread = threading.Thread(target=lambda: [importlib.import_module(name) for name in names],
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
            module = self._module = importlib.import_module(self._name)
        return getattr(module, name)


stats = _Lazy("scipy.stats")
special = _Lazy("scipy.special")
