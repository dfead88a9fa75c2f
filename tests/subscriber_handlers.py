"""A --handler for the catch-up subscriber tests: each event id as a line of $SNTRACK_TEST_OUT, written and flushed
before it counts as delivered, after $SNTRACK_TEST_DELAY_S seconds (a slow handler keeps the catch-up going)."""

from __future__ import annotations

import os
import time

from schemas import Event

_out = None


def record(event: Event) -> None:
    global _out
    if _out is None:
        _out = open(os.environ["SNTRACK_TEST_OUT"], "a", encoding="utf-8")  # noqa: SIM115 - open for the process
    time.sleep(float(os.environ.get("SNTRACK_TEST_DELAY_S", "0")))
    _out.write(f"{event.event_id}\n")
    _out.flush()
