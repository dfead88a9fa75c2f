"""A dependency-free progress line for long work; silent when stderr is not a terminal."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, unit: str = "items", stream=None):
        self.label = label
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.started = time.perf_counter()
        self._last_draw = 0.0

    def __enter__(self) -> Progress:
        return self

    def update(self, done: int, total: int | None = None) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self._last_draw < 0.1 and done != total):
            return
        self._last_draw = now
        rate = done / max(now - self.started, 1e-9)
        if total:
            filled = int(30 * done / total)
            bar = f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}"
        else:
            bar = f"{done}"
        self.stream.write(f"\r{self.label} {bar} {self.unit} ({rate:,.0f}/s)")
        self.stream.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
