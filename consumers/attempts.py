"""Which redelivered messages were in hand when a consumer died, counted durably in PostgreSQL.

The broker cannot tell a crash from a restart: RabbitMQ 3.10 counts a delivery for every unacked message of a
closing channel, prefetched or not. So the runtime counts for itself: before it handles a redelivered message it
adds one attempt to the message's row (one statement for the batch); once the message is settled the row is
deleted. A graceful stop settles or leaves untouched what it holds, a message that was prefetched but never
handled is never counted, and only a message in hand at a crash keeps a growing count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import asyncpg
from aio_pika.abc import AbstractIncomingMessage


def message_key(message: AbstractIncomingMessage) -> str:
    """The message_id (the event_id for every producer of this project), else a digest of the body."""
    return message.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()


class AttemptLedger:
    def __init__(self, pool: asyncpg.Pool, consumer: str):
        self.pool = pool
        self.consumer = consumer

    async def counts(self, keys: Iterable[str]) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT message_key, attempts FROM consumer_attempts WHERE consumer = $1 AND message_key = ANY($2)",
            self.consumer, list(keys))
        return {r["message_key"]: r["attempts"] for r in rows}

    async def record(self, keys: Iterable[str]) -> None:
        await self.pool.execute(
            "INSERT INTO consumer_attempts (consumer, message_key, attempts) SELECT $1, unnest($2::text[]), 1 "
            "ON CONFLICT (consumer, message_key) DO UPDATE "
            "SET attempts = consumer_attempts.attempts + 1, last_attempt_at = now()",
            self.consumer, sorted(set(keys)))

    async def forget(self, keys: Iterable[str]) -> None:
        await self.pool.execute("DELETE FROM consumer_attempts WHERE consumer = $1 AND message_key = ANY($2)",
                                self.consumer, list(keys))
