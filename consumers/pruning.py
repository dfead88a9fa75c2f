"""Bookkeeping that grows with what needs it, not with the journal: pruning `applied_events`.

A projection's `applied_events` row for an event makes a redelivery of it a no-op. For the event types a projection
applies idempotently (`Projection.idempotent_types`: applying one again is a no-op whatever was applied in between,
as `trials`' metric upsert, which keeps the highest seq), that row is redundant once the journal holds the event, and
the daemon deletes it:

- never a row whose event is not in the journal: replay's swap waits for the journal to hold every event the live
  projection applied (it finds them by their rows), and a pruned one is in the journal by construction;
- never among the newest KEEP journal positions: lag (consumers/lag.py) is the distance from the head to the newest
  event a projection has a row for, so it stays exact while a consumer is less than KEEP positions behind (a
  duplicate delivery can use up a position without a row, so that is at most KEEP events; further behind, lag may
  read up to the distance to the previous start or stop higher: never lower);
- in chunks of CHUNK journal positions, each its own short transaction, walking the journal upwards from where the
  previous pass stopped, every `ConsumerConfig.prune_every_s`. A daemon starts from the journal's first position,
  and walks from it again every FULL_PASS_EVERY passes, so rows a replay's swap puts back are pruned too;
- then VACUUM, when the daemon's role owns the table, so that new rows reuse the space (a daemon logged in as the
  writer leaves that to autovacuum). The index keeps a pruned row's space: event ids grow with time, so new
  entries go to its right edge (mid-soak, 53.2 of the table's 64.9 MB at 923,692 journal events).

A redelivered pruned event is applied again, as a no-op, and counted as applied
(tests/test_pruning.py::test_pruned_metric_rows_are_redelivered_as_no_ops_and_replay_still_equals_live).
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection

import asyncpg
import structlog

from consumers.lag import journal_head
from consumers.projections.base import Projection

log = structlog.get_logger("sntrack.consumer")

KEEP = 10_000  # the newest journal positions whose rows are kept (exact lag up to this far behind)
CHUNK = 20_000  # journal positions per DELETE
FULL_PASS_EVERY = 60  # passes; at the default prune_every_s (60 s), once an hour

PRUNE = """
DELETE FROM applied_events a USING events e
WHERE e.position > $3 AND e.position <= $4 AND e.event_type = ANY($2::text[])
  AND a.projection = $1 AND a.event_id = e.event_id
"""
# VACUUM needs the table's owner (or a superuser): a daemon logged in as the writer leaves it to autovacuum.
MAY_VACUUM = """
SELECT pg_has_role(current_user, c.relowner, 'USAGE') FROM pg_class c WHERE c.oid = 'applied_events'::regclass
"""


async def prune(pool: asyncpg.Pool, projection: str, types: Collection[str], *, above: int = 0,
                keep: int = KEEP) -> tuple[int, int]:
    """Delete `projection`'s rows for journal events of `types` above position `above` and older than the newest
    `keep`. Returns (rows deleted, the position it reached)."""
    deleted = 0
    async with pool.acquire() as conn:
        until = await journal_head(conn) - keep
    while above < until:
        upper = min(above + CHUNK, until)
        async with pool.acquire() as conn:
            status = await conn.execute(PRUNE, projection, list(types), above, upper)
        deleted += int(status.split()[-1])
        above = upper
    if deleted:
        await _vacuum(pool)
    return deleted, max(above, 0)


async def _vacuum(pool: asyncpg.Pool) -> None:
    """Make the deleted rows' space reusable now, when this role may, rather than when autovacuum (off on some
    servers) gets to it: without it, the table keeps growing as if nothing were pruned. SKIP_LOCKED: a replay's swap
    or another daemon's VACUUM holding the table is not waited for."""
    async with pool.acquire() as conn:
        if await conn.fetchval(MAY_VACUUM):
            await conn.execute("VACUUM (SKIP_LOCKED) applied_events")


async def keep_pruning(pool: asyncpg.Pool, projection: Projection, every_s: float) -> None:
    """Prune `projection`'s bookkeeping every `every_s` seconds until cancelled (the daemon's background task).
    A failed pass (the database away, or anything else) is logged and tried again at the next one: the consumers
    beside it go on either way."""
    reached, passes = 0, 0
    while True:
        await asyncio.sleep(every_s)
        if passes % FULL_PASS_EVERY == 0:
            reached = 0
        passes += 1
        try:
            deleted, reached = await prune(pool, projection.name, projection.idempotent_types, above=reached,
                                           keep=KEEP)
        except Exception as exc:  # noqa: BLE001 - pruning is housekeeping: it must never stop the daemon
            log.warning("could not prune the bookkeeping; trying again later", consumer=projection.name,
                        error=repr(exc))
            continue
        if deleted:
            log.info("bookkeeping pruned", consumer=projection.name, rows=deleted, position=reached)
