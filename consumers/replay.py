"""Rebuild a projection from the journal with the same `project` code the live consumer runs.

The rebuild is one (writing) transaction: readers keep seeing the old rows until it commits, and a live consumer of the
same projection simply waits on the locks; whatever it then applies that the replay already applied is
recognised by the bookkeeping and skipped, so the two can run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from consumers.persistence import apply_events
from consumers.projection import Projection
from schemas.events import EVENT_ADAPTER

PAGE = 2000


@dataclass
class ReplayResult:
    events: int
    seconds: float

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


async def replay(
    pool: asyncpg.Pool,
    projection: Projection,
    *,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Rebuild `projection` from the journal. Uses two connections from `pool`: one reads and validates the
    next page while the other writes the current one, so Python and PostgreSQL work at the same time."""
    if not projection.replayable:
        raise ValueError(f"projection {projection.name!r} is the journal itself and cannot be replayed")
    started = time.perf_counter()
    async with pool.acquire() as reader, pool.acquire() as writer:
        total = await reader.fetchval(
            "SELECT count(*) FROM events WHERE $1::timestamptz IS NULL OR occurred_at <= $1", until
        )
        pages: asyncio.Queue[list | None] = asyncio.Queue(maxsize=2)

        async def read() -> None:
            last = 0
            while rows := await reader.fetch(
                "SELECT position, envelope::text AS envelope FROM events "
                "WHERE position > $1 AND ($2::timestamptz IS NULL OR occurred_at <= $2) ORDER BY position LIMIT $3",
                last, until, PAGE,
            ):
                last = rows[-1]["position"]
                await pages.put([EVENT_ADAPTER.validate_json(r["envelope"]) for r in rows])
            await pages.put(None)

        reading = asyncio.create_task(read())
        done = 0
        try:
            async with writer.transaction():
                if projection.tables:
                    await writer.execute(f"TRUNCATE {', '.join(projection.tables)}")
                await writer.execute("DELETE FROM applied_events WHERE projection = $1", projection.name)
                while (events := await _next_page(pages, reading)) is not None:
                    await apply_events(writer, projection, events)
                    done += len(events)
                    if progress:
                        progress(done, total)
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
    return ReplayResult(done, time.perf_counter() - started)


async def _next_page(pages: asyncio.Queue, reading: asyncio.Task) -> list | None:
    """The next page, or the reader's exception if it failed before producing one."""
    getter = asyncio.ensure_future(pages.get())
    await asyncio.wait({getter, reading}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    reading.result()  # raises the reader's error
    raise RuntimeError("journal reader stopped before the end of the journal")
