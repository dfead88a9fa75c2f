"""Where a consumer batch's time goes: a timestamp at the end of each stage, one JSON line per applied batch.

Off by default. When ConsumerConfig.stage_log names a folder (SNTRACK_STAGE_LOG), each consumer appends to
`<folder>/<consumer>.jsonl` the id and arrival time of each event of a batch and the stamps of its stages
(bench/pipeline.py turns them into the latency breakdown). Stamps are time.perf_counter(), CLOCK_MONOTONIC on Linux,
so they compare with another process's on the same machine. Off, `mark` is one context-variable lookup and the
runtime keeps no stamps.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # `sntrack report` imports persistence, and so this module, without the event models
    from aio_pika.abc import AbstractIncomingMessage

    from schemas import Event

Marks = list[tuple[str, float]]

_marks: contextvars.ContextVar[Marks | None] = contextvars.ContextVar("sntrack_stage_marks", default=None)


def mark(stage: str) -> None:
    """Stamp the end of `stage` for the batch in hand, when its stages are being recorded."""
    marks = _marks.get()
    if marks is not None:
        marks.append((stage, time.perf_counter()))


class StageLog:
    def __init__(self, folder: Path, consumer: str):
        folder.mkdir(parents=True, exist_ok=True)
        self._file = (folder / f"{consumer}.jsonl").open("a", buffering=1)
        self._arrived: dict[int, float] = {}

    def arrived(self, message: AbstractIncomingMessage) -> None:
        self._arrived[id(message)] = time.perf_counter()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Record the stages of the batch processed inside; its first stamp, `taken`, is now."""
        token = _marks.set([("taken", time.perf_counter())])
        try:
            yield
        finally:
            _marks.reset(token)

    def applied(self, accepted: Sequence[tuple[AbstractIncomingMessage, Event]]) -> None:
        """Write the line of a batch whose (message, event) pairs were applied and acked."""
        events = [[str(event.event_id), self._arrived.pop(id(message), None)] for message, event in accepted]
        self._file.write(json.dumps({"events": events, "marks": _marks.get()}) + "\n")

    def restart(self) -> None:
        """Forget the arrivals of an earlier channel's deliveries (they come back as new messages)."""
        self._arrived.clear()
