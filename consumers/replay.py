"""Rebuild a projection from the journal with the same `project` code the live consumer runs.

The rebuild is one transaction: readers keep seeing the old rows until it commits, and a live consumer of the
same projection simply waits on the locks; whatever it then applies that the replay already applied is
recognised by the bookkeeping and skipped, so the two can run side by side.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from consumers.persistence import apply_events
from consumers.projection import Projection
from schemas.events import EVENT_ADAPTER

PAGE = 5000


@dataclass
class ReplayResult:
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


async def replay(
    conn: asyncpg.Connection,
    projection: Projection,
    *,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    if not projection.replayable:
        raise ValueError(f"projection {projection.name!r} is the journal itself and cannot be replayed")
    started = time.perf_counter()
    total = await conn.fetchval(
        "SELECT count(*) FROM events WHERE $1::timestamptz IS NULL OR occurred_at <= $1", until
    )
    done = 0
    async with conn.transaction():
        if projection.tables:
            await conn.execute(f"TRUNCATE {', '.join(projection.tables)}")
        await conn.execute("DELETE FROM applied_events WHERE projection = $1", projection.name)
        last = 0
        while True:
            rows = await conn.fetch(
                "SELECT position, envelope::text AS envelope FROM events "
                "WHERE position > $1 AND ($2::timestamptz IS NULL OR occurred_at <= $2) ORDER BY position LIMIT $3",
                last, until, PAGE,
            )
            if not rows:
                break
            last = rows[-1]["position"]
            events = [EVENT_ADAPTER.validate_json(r["envelope"]) for r in rows]
            await apply_events(conn, projection, events)
            done += len(events)
            if progress:
                progress(done, total)
    return ReplayResult(done, time.perf_counter() - started)
