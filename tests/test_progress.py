"""Progress bars: log lines print above the bar instead of tearing it; the worker's bar counts epochs."""

from __future__ import annotations

import io
import sys

import structlog

from sntrack.logging import configure_logging
from sntrack.progress import EpochCounter, Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_lines_print_above_the_bar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    configure_logging(json_lines=True)
    try:
        with Progress("work", unit="epochs", total=10) as progress:
            progress.update(3)
            structlog.get_logger("test").info("hello", trial_id="t1")
            progress.update(5)
    finally:
        structlog.reset_defaults()
    segments = [line.split("\r")[-1] for line in terminal.getvalue().split("\n")]
    assert any(s.startswith('{"trial_id": "t1", "event": "hello"') for s in segments), terminal.getvalue()
    assert "5/10" in terminal.getvalue()


class Recorder:
    def __init__(self):
        self.calls = []

    def started(self, payload):
        self.calls.append("started")

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        self.calls.append(epoch)

    def stopped(self, outcome, model):
        self.calls.append("stopped")


def test_epoch_counter_moves_past_the_epochs_a_stopped_trial_skipped():
    with Progress("study", unit="epochs", total=10, stream=Terminal()) as progress:
        inner = Recorder()
        counter = EpochCounter(progress, inner, 5, lambda: "trial 1/2")
        counter.started(None)
        counter.epoch(0, {}, None)
        counter.epoch(1, {}, None)
        assert progress.bar.n == 2
        counter.stopped(None, None)  # pruned after two epochs
        assert progress.bar.n == 5 and inner.calls == ["started", 0, 1, "stopped"]
