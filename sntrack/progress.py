"""Progress bars for long work (tqdm, installed with optuna); silent when stderr is not a terminal.

While a bar is drawn, log lines go through `tqdm.write` (sntrack.logging asks `write_line`), so they print above
the bar instead of tearing it (tests/test_progress.py)."""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

# tqdm is imported where a bar is made, not with the logging every command configures (~20 ms of each start).
_active: list[tuple[tqdm, IO[str]]] = []  # bars drawn now, with the stream each draws on
_lock = threading.Lock()


def write_line(line: str, stream: IO[str]) -> None:
    """Print `line` to `stream`; above the bar when one is drawn on that stream."""
    with _lock:
        drawn = any(drawn_on is stream for _, drawn_on in _active)
    if drawn:  # a bar was made: tqdm is loaded
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    else:
        stream.write(line + "\n")
        stream.flush()


class Progress:
    """`update(done, total)` with absolute figures, as replay and publishing report them."""

    def __init__(self, label: str, unit: str = "items", stream: IO[str] | None = None, total: int | None = None):
        from tqdm import tqdm

        self.stream = stream or sys.stderr
        size = shutil.get_terminal_size((100, 24))  # a pty of unknown size (0×0) would hide the bar
        self.bar = tqdm(desc=label, unit=f" {unit}", total=total, file=self.stream,
                        disable=not self.stream.isatty(), leave=True, ncols=size.columns, nrows=size.lines)

    def __enter__(self) -> Progress:
        if not self.bar.disable:
            with _lock:
                _active.append((self.bar, self.stream))
        return self

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def describe(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def __exit__(self, *exc: object) -> None:
        with _lock:
            if (self.bar, self.stream) in _active:
                _active.remove((self.bar, self.stream))
        self.bar.close()


class EpochCounter:
    """Wraps a trial recorder (started / epoch / stopped, called on the training thread) to move a bar of
    epochs over the whole run: the ETA covers every trial this worker still has to train. A trial that stops early
    (pruned, failed) moves the bar past its remaining epochs."""

    def __init__(self, progress: Progress, inner: Any, epochs: int, trial_label: Callable[[], str]):
        self.progress, self.inner, self.epochs, self.trial_label = progress, inner, epochs, trial_label
        self.seen = 0

    def started(self, payload: Any) -> None:
        self.progress.describe(self.trial_label())
        self.inner.started(payload)

    def epoch(self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None,
              step: int | None = None) -> None:
        self.inner.epoch(epoch, measurements, spectral_norms, step)
        self.seen += 1
        self.progress.update(self.progress.bar.n + 1)

    def stopped(self, outcome: Any, model: Any) -> None:
        self.inner.stopped(outcome, model)
        self.progress.update(self.progress.bar.n + max(0, self.epochs - self.seen))

    def settle(self) -> None:
        self.inner.settle()
