"""What the runtime feeds: a handler takes a batch of validated events and makes their effect durable.

The runtime acks a batch only after `handle` returns. A handler signals trouble by raising:
- `RetryLater` (or a transient database/network error): nothing is acked, the same batch is tried again
  after a backoff;
- `DeadLetter`: this one event cannot be applied; it goes to the dead-letter queue with the reason;
- anything else: the runtime retries the events one by one to isolate the culprit, which is dead-lettered
  with reason handler_error after a few attempts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from consumers.persistence import Store
from consumers.projections.base import Projection
from consumers.topology import QueueSpec
from schemas import Event


class RetryLater(Exception):
    """A dependency is away (database, MLflow): keep the messages, try again later."""


class DeadLetter(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Handler(Protocol):
    name: str
    queue: QueueSpec

    async def handle(self, events: Sequence[Event]) -> None: ...


class ProjectionHandler:
    """A SQL projection behind the Handler interface: the batch and its bookkeeping in one transaction."""

    def __init__(self, projection: Projection, store: Store):
        self.projection = projection
        self.store = store
        self.name = projection.name
        self.queue = projection.queue

    async def handle(self, events: Sequence[Event]) -> None:
        await self.store.apply(self.projection, events)
