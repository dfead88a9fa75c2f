"""An extra subscriber: its own queue bound with routing patterns; each valid event written as a JSON line.

Its queue is bounded (consumers.topology.subscriber_queue): a subscriber that falls that far behind loses the
oldest messages of its queue (dead-lettered to sntrack.sub.NAME.dlq with x-death reason maxlen), never the
broker's disk. Everything it missed is in the journal (`events`, ordered by position)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TextIO

from consumers.topology import subscriber_queue
from schemas import Event

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class JsonLinesSubscriber:
    """A Handler: the batch is written and flushed before the runtime acks it (at-least-once output)."""

    def __init__(self, name: str, patterns: Sequence[str], stream: TextIO):
        if not NAME.match(name):
            raise ValueError(f"subscriber name {name!r}: use 1-64 of a-z, 0-9, _ and -, starting with a letter/digit")
        self.name = f"sub.{name}"
        self.queue = subscriber_queue(name, tuple(patterns))
        self.stream = stream

    async def handle(self, events: Sequence[Event]) -> None:
        self.stream.write("".join(event.model_dump_json() + "\n" for event in events))
        self.stream.flush()
