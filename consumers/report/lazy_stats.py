"""scipy.stats (and scipy.special), imported when a statistic first needs it, not with the report's modules.

Importing scipy.stats takes most of a second. `prefetch()` starts that import in a background thread, so that it
overlaps work that waits (the report's database reads); the first use of `stats.X` then waits for it to finish.
Python's import lock makes the two imports one: whichever thread comes second waits for the first.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _load() -> None:
    importlib.import_module("scipy.stats")


def prefetch() -> threading.Thread:
    """Start importing scipy.stats in a daemon thread (once); join the thread before the process ends."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_load, name="import-scipy.stats", daemon=True)
            _thread.start()
        return _thread


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
