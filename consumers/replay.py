"""Rebuild a projection from the journal beside the live consumer: set-based SQL that gives the rows its `project`
gives (consumers/bulk.py), or `project` itself, event by event.

The rebuild never writes the live tables while it works (docs/replay.md):

1. Shadow: a schema `sntrack_rebuild_<name>` gets empty copies of the projection's tables (columns, defaults,
   constraints, then indexes, triggers and grants) and its own `applied_events`. The journal is loaded into it with
   `search_path` pointing there first, so the projection's SQL (its `bulk` statements, or `project` through
   `apply_events`) runs unchanged. Live tables take no lock but ACCESS SHARE on their catalog entries.
2. Catch-up: every journal event the shadow has not applied (an anti-join, not a position watermark, so events
   that commit out of position order are not missed) is applied, outside any lock, and a fence is set: every
   event the shadow still lacks is above a known position (`_catch_up`).
3. No lost effect: the swap waits, bounded by `journal_wait_s`, until the journal holds every event the live
   projection applied (they can be ahead of the journal consumer); otherwise `ReplayAborted`, live tables untouched.
4. Swap, one short transaction under `lock_timeout`, locks in the order the live consumer takes them
   (`applied_events` EXCLUSIVE, then the tables ACCESS EXCLUSIVE), retried after a fresh catch-up when a lock is
   not granted in time, so it never deadlocks a live transaction: apply the journal events above the fence, check
   by counts that the journal lost nothing meanwhile, move the live tables out and the shadow ones in (ALTER TABLE
   SET SCHEMA), re-point dependent views, add the shadow's applied events to the projection's bookkeeping and
   check by count that the live projection applied nothing the shadow lacks (else roll back and wait as in 3).
   Readers wait at most for this swap (ReplayResult.swap_seconds).

Proven by tests/test_replay_live.py. With `until`, step 1 writes a schema of the caller's choosing, which is kept,
and nothing is swapped: the live tables are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import structlog

from consumers.bulk import journal_kinds, project_journal, supports
from consumers.persistence import WRITING_SHADOW, apply_events
from consumers.projections.base import Projection
from schemas.upcasting import read_stored

PAGE = 2000
log = structlog.get_logger("sntrack.replay")
LOCK_TIMEOUT = "100ms"  # a swap waits this long for its locks, then lets the live consumer go on and retries
SWAP_ATTEMPTS = 100
CATCH_UP_ROUNDS = 5
BOOKKEEPING = "applied_events"

Progress = Callable[[int, int], None]


class ReplayAborted(RuntimeError):
    """The rebuild gave up; the live tables are as they were."""


@dataclass
class ReplayResult:
    events: int
    seconds: float
    schema: str  # where the rebuilt tables are: the live schema after a swap, else the `until` schema
    swap_seconds: float = 0.0  # how long the swap held the locks readers wait on
    set_based: bool = False  # built by the projection's set-based SQL, not event by event through `project`

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else float("inf")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def replay(
    pool: asyncpg.Pool,
    projection: Projection,
    *,
    until: datetime | None = None,
    into: str | None = None,
    journal_wait_s: float = 30.0,
    progress: Progress | None = None,
    set_based: bool = True,
) -> ReplayResult:
    """Rebuild `projection` from the journal and swap it in; with `until`, build the state as of that time into
    schema `into` instead and leave the live tables alone. Uses two connections from `pool`. `set_based=False`
    builds through `project` even where the projection has set-based SQL (the reference the tests compare with)."""
    if not projection.replayable:
        raise ValueError(f"projection {projection.name!r} is the journal itself and cannot be replayed")
    if (until is None) != (into is None):
        raise ValueError("a rebuild up to a time needs a schema to write into, and only such a rebuild has one")
    started = time.perf_counter()
    async with pool.acquire() as reader, pool.acquire() as writer:
        live = await writer.fetchval("SELECT current_schema()")
        shadow = into or f"sntrack_rebuild_{projection.name}"
        retired = f"sntrack_retired_{projection.name}"
        if not await writer.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", f"sntrack.replay.{shadow}"):
            raise ReplayAborted(f"another rebuild into {shadow} is running")
        try:
            if into is None:
                await writer.execute(f"DROP SCHEMA IF EXISTS {_ident(shadow)}, {_ident(retired)} CASCADE")
            elif await writer.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", into):
                raise ValueError(f"schema {into} already exists; drop it or choose another with --into")
            try:
                done, set_based = await _build(reader, writer, projection, live, shadow, until, progress, set_based)
                if into is not None:
                    await _grant_usage_like(writer, live, into)
                    return ReplayResult(done, time.perf_counter() - started, into, set_based=set_based)
                await _wait_for_journal(writer, projection, journal_wait_s)
                done, held = await _swap(writer, projection, live, shadow, retired, done, journal_wait_s, progress)
            except BaseException:
                with contextlib.suppress(Exception):
                    await writer.execute(f"DROP SCHEMA IF EXISTS {_ident(shadow)} CASCADE")
                raise
            if not await _drop_retired(writer, projection, retired):
                log.warning("readers kept the swapped-out tables locked; the next rebuild drops them",
                            schema=retired)
            await writer.execute(f"DROP SCHEMA {_ident(shadow)} CASCADE")
        finally:
            await writer.execute("SELECT pg_advisory_unlock(hashtext($1))", f"sntrack.replay.{shadow}")
    return ReplayResult(done, time.perf_counter() - started, live, held, set_based)


async def _drop_retired(conn: asyncpg.Connection, projection: Projection, retired: str,
                        attempts: int = SWAP_ATTEMPTS) -> bool:
    """Drop the swapped-out tables and their schema; False when readers kept them locked for all `attempts`.

    A reader that resolved the live names just before the swap can hold one retired table while it waits for the
    other: a DROP waiting for it would deadlock with it, so the DROP waits LOCK_TIMEOUT, then lets it finish and
    tries again. The rebuilt tables are live either way; the next rebuild removes retired tables left behind
    (tests/test_replay_live.py::test_retired_tables_a_reader_holds_are_dropped_once_it_lets_go)."""
    tables = ", ".join(f"{_ident(retired)}.{_ident(t)}" for t in projection.tables)
    for attempt in range(attempts):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                # No CASCADE on the retired tables: an object still depending on them must fail loudly, not vanish.
                await conn.execute(f"DROP TABLE {tables}; DROP SCHEMA {_ident(retired)}")
            return True
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            await asyncio.sleep(random.uniform(0.05, 0.05 * min(attempt + 1, 10)))
    return False


async def _build(reader: asyncpg.Connection, writer: asyncpg.Connection, projection: Projection, live: str,
                 shadow: str, until: datetime | None, progress: Progress | None, set_based: bool) -> tuple[int, bool]:
    """Create the shadow tables and apply the journal (up to `until`) to them, in one transaction: set-based
    where the projection's SQL reads every event version the journal holds, else through `project`. (events,
    whether set-based)."""
    if set_based and (done := await _build_set_based(writer, projection, live, shadow, until)) is not None:
        if progress:
            progress(done, done)
        return done, True
    return await _build_by_project(reader, writer, projection, live, shadow, until, progress), False


async def _build_set_based(conn: asyncpg.Connection, projection: Projection, live: str, shadow: str,
                           until: datetime | None) -> int | None:
    """The whole journal in a few INSERT … SELECT statements (consumers/bulk.py), all reading one snapshot; how many
    events, or None (nothing done) when the journal holds an event version the projection's SQL does not read."""
    async with conn.transaction(isolation="repeatable_read"):
        kinds = await journal_kinds(conn, until)
        if not await supports(conn, projection, kinds):
            return None
        await _create_tables(conn, projection, live, shadow, keys=False)  # built once after the load: faster
        await _use(conn, shadow, live)
        await project_journal(conn, projection, until)
        await _use(conn, live)
        await _add_keys(conn, projection, live, shadow)
        await _finish_tables(conn, projection, live, shadow, triggers=until is None)
    return sum(kind["n"] for kind in kinds)


async def _build_by_project(reader: asyncpg.Connection, writer: asyncpg.Connection, projection: Projection,
                            live: str, shadow: str, until: datetime | None, progress: Progress | None) -> int:
    """Read pages of the journal and apply them through `project`, one connection reading and validating the next
    page while the other writes the current one."""
    total = await reader.fetchval(
        "SELECT count(*) FROM events WHERE $1::timestamptz IS NULL OR occurred_at <= $1", until)
    pages: asyncio.Queue[list | None] = asyncio.Queue(maxsize=2)

    async def read() -> None:
        last = 0
        while rows := await reader.fetch(
            "SELECT position, envelope::text AS envelope FROM events "
            "WHERE position > $1 AND ($2::timestamptz IS NULL OR occurred_at <= $2) ORDER BY position LIMIT $3",
            last, until, PAGE,
        ):
            last = rows[-1]["position"]
            await pages.put([read_stored(r["envelope"]) for r in rows])
        await pages.put(None)

    reading = asyncio.create_task(read())
    done = 0
    try:
        async with writer.transaction():
            await _create_tables(writer, projection, live, shadow, keys=True)
            await _use(writer, shadow, live)
            while (events := await _next_page(pages, reading)) is not None:
                await apply_events(writer, projection, events)
                done += len(events)
                if progress:
                    progress(done, total)
            await _use(writer, live)
            await _finish_tables(writer, projection, live, shadow, triggers=until is None)
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    return done


async def _use(conn: asyncpg.Connection, *schemas: str) -> None:
    """Point unqualified names at `schemas` for the rest of the transaction; with a shadow first (shadow, live), the
    projection's statements know that they write the shadow (WRITING_SHADOW)."""
    await conn.execute("SELECT set_config('search_path', $1, true), set_config($2, $3, true)",
                       ", ".join(map(_ident, schemas)), WRITING_SHADOW, "on" if len(schemas) > 1 else "off")


async def _catalog(conn: asyncpg.Connection, sql: str, live: str, table: str) -> list[asyncpg.Record]:
    return await conn.fetch(sql, f"{_ident(live)}.{_ident(table)}")


INDEXES = """
SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS def, con.conname, con.contype::text AS contype
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE i.indrelid = $1::regclass ORDER BY c.relname
"""
TRIGGERS = "SELECT pg_get_triggerdef(oid) AS def FROM pg_trigger WHERE tgrelid = $1::regclass AND NOT tgisinternal"
GRANTS = """
SELECT a.privilege_type AS privilege, CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
FROM pg_class c CROSS JOIN aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE c.oid = $1::regclass AND a.grantee <> c.relowner
"""
# The live table's owner when it is not the role replaying (a superuser replaying the owner's tables).
OTHER_OWNER = """
SELECT quote_ident(pg_get_userbyid(relowner)) FROM pg_class
WHERE oid = $1::regclass AND relowner <> (SELECT oid FROM pg_roles WHERE rolname = current_user)
"""


def _retarget(definition: str, live: str, shadow: str, table: str) -> str:
    """A CREATE INDEX/TRIGGER statement of a live table, made to create the same on the shadow table."""
    on_live = f" ON {_ident(live)}.{_ident(table)} "
    if on_live not in definition:  # pg_get_*def omits quotes a name does not need
        on_live = f" ON {live}.{table} "
    return definition.replace(on_live, f" ON {_ident(shadow)}.{_ident(table)} ", 1)


async def _create_tables(conn: asyncpg.Connection, projection: Projection, live: str, shadow: str, *,
                         keys: bool) -> None:
    """The shadow schema: empty copies of the bookkeeping and the projection's tables, with (`keys`) or without their
    primary and unique keys. The other indexes come after the load, which is faster (_finish_tables)."""
    await conn.execute(f"CREATE SCHEMA {_ident(shadow)}")
    for table in (BOOKKEEPING, *projection.tables):
        await conn.execute(f"CREATE TABLE {_ident(shadow)}.{_ident(table)} "
                           f"(LIKE {_ident(live)}.{_ident(table)} INCLUDING ALL EXCLUDING INDEXES)")
    if keys:
        await _add_keys(conn, projection, live, shadow)


async def _add_keys(conn: asyncpg.Connection, projection: Projection, live: str, shadow: str) -> None:
    """The primary and unique keys of the live tables on the shadow ones (ON CONFLICT needs them)."""
    for table in (BOOKKEEPING, *projection.tables):
        for index in await _catalog(conn, INDEXES, live, table):
            if index["contype"] in ("p", "u"):
                await conn.execute(_retarget(index["def"], live, shadow, table))
                kind = "PRIMARY KEY" if index["contype"] == "p" else "UNIQUE"
                await conn.execute(f"ALTER TABLE {_ident(shadow)}.{_ident(table)} ADD CONSTRAINT "
                                   f"{_ident(index['conname'])} {kind} USING INDEX {_ident(index['name'])}")


async def _finish_tables(conn: asyncpg.Connection, projection: Projection, live: str, shadow: str, *,
                         triggers: bool) -> None:
    """The other indexes (same names as live), the grants and owner (the writer and reader roles keep working after
    a swap: tests/test_db_roles.py), and (for a table that will be swapped in) triggers."""
    for table in projection.tables:
        for index in await _catalog(conn, INDEXES, live, table):
            if index["contype"] is None:
                await conn.execute(_retarget(index["def"], live, shadow, table))
        await _copy_grants(conn, live, shadow, table)
        if owner := await conn.fetchval(OTHER_OWNER, f"{_ident(live)}.{_ident(table)}"):
            await conn.execute(f"ALTER TABLE {_ident(shadow)}.{_ident(table)} OWNER TO {owner}")
        if triggers:
            for trigger in await _catalog(conn, TRIGGERS, live, table):
                await conn.execute(_retarget(trigger["def"], live, shadow, table))
    await _copy_grants(conn, live, shadow, BOOKKEEPING)  # `report --schema` reads it as the reader
    # Statistics for the catch-up's anti-joins (without them one took 1.4 s inside the swap); the projection's
    # tables are left to autovacuum, as after the old TRUNCATE-and-refill (ANALYZE of trial_metrics costs 5%).
    await conn.execute(f"ANALYZE {_ident(shadow)}.{BOOKKEEPING}")


async def _copy_grants(conn: asyncpg.Connection, live: str, shadow: str, table: str) -> None:
    for grant in await _catalog(conn, GRANTS, live, table):
        await conn.execute(f"GRANT {grant['privilege']} ON {_ident(shadow)}.{_ident(table)} TO {grant['grantee']}")


SCHEMA_USAGE = """
SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END AS grantee
FROM pg_namespace n CROSS JOIN aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE n.nspname = $1 AND a.privilege_type = 'USAGE' AND a.grantee <> n.nspowner
"""


async def _grant_usage_like(conn: asyncpg.Connection, live: str, schema: str) -> None:
    """Whoever may use the live schema may use a past state built beside it (the reader's `report --schema`); its
    tables carry the live tables' grants."""
    for row in await conn.fetch(SCHEMA_USAGE, live):
        await conn.execute(f"GRANT USAGE ON SCHEMA {_ident(schema)} TO {row['grantee']}")


# A removed study's events get no bookkeeping row (consumers/persistence.py), so they are not read again.
_KEPT = "e.model_run_id NOT IN (SELECT model_run_id FROM deleted_studies)"
UNAPPLIED = f"""
SELECT e.envelope::text AS envelope FROM events e
WHERE e.position > $3 AND {_KEPT}
  AND NOT EXISTS (SELECT 1 FROM {{shadow}}.applied_events s WHERE s.projection = $1 AND s.event_id = e.event_id)
ORDER BY e.position LIMIT $2
"""
JOURNAL_KEPT = f"SELECT count(*) FROM events e WHERE {_KEPT}"


async def _apply_unapplied(conn: asyncpg.Connection, projection: Projection, shadow: str, live: str,
                           done: int, progress: Progress | None, *, above: int = 0) -> int:
    """Inside the caller's transaction: apply to the shadow every journal event above position `above` that it
    lacks; how many. Ends at a page that was not full: under a live stream, waiting for an empty one could chase
    the stream for minutes, a full anti-join per page (the swap, whose locks stop the journal, needs no more)."""
    applied = 0
    while rows := await conn.fetch(UNAPPLIED.format(shadow=_ident(shadow)), projection.name, PAGE, above):
        await _use(conn, shadow, live)
        await apply_events(conn, projection, [read_stored(r["envelope"]) for r in rows])
        await _use(conn, live)
        applied += len(rows)
        if progress:
            progress(done + applied, done + applied)
        if len(rows) < PAGE:
            break
    return applied


FENCE = "SELECT coalesce(max(position), 0) AS floor, pg_current_snapshot()::text AS snapshot FROM events"
WRITERS_LEFT = "SELECT count(*) FROM pg_snapshot_xip($1::text::pg_snapshot) x WHERE pg_xact_status(x) = 'in progress'"
FENCE_WAIT_S = 5.0


async def _writers_ended(conn: asyncpg.Connection, snapshot: str) -> bool:
    """Wait, at most FENCE_WAIT_S, until the transactions in progress at `snapshot` have ended."""
    deadline = time.monotonic() + FENCE_WAIT_S
    while await conn.fetchval(WRITERS_LEFT, snapshot):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _catch_up(conn: asyncpg.Connection, projection: Projection, shadow: str, live: str, done: int,
                    progress: Progress | None) -> tuple[int, int]:
    """Outside any lock: apply what the journal received during the build, until a round finds little.

    Returns (events applied, floor): every journal event at or below position `floor` is then in the shadow, so
    the swap scans only above it. Positions do not follow commit order, hence the fence: the largest position
    visible to a snapshot, then waiting until the transactions in progress at that snapshot have ended. A later
    transaction takes its position after the fence (a journal batch takes its transaction id before its events row,
    in the statement that holds applied_events' lock: consumers/persistence.py), so above the floor; the earlier
    ones are visible to the anti-join that follows. If they do not end within FENCE_WAIT_S the floor stays the last
    one set (0 at first: the swap scans everything). Each round scans only above the floor the previous one set."""
    applied, floor = 0, 0
    for _ in range(CATCH_UP_ROUNDS):
        fence = await conn.fetchrow(FENCE)
        fenced = await _writers_ended(conn, fence["snapshot"])
        async with conn.transaction():
            fresh = await _apply_unapplied(conn, projection, shadow, live, done + applied, progress, above=floor)
        applied += fresh
        if fenced:
            floor = fence["floor"]
        if fresh < PAGE:
            break
    return applied, floor


NOT_JOURNALED = """
SELECT count(*) AS missing, (array_agg(a.event_id))[1:3] AS sample FROM applied_events a
WHERE a.projection = $1 AND NOT EXISTS (SELECT 1 FROM events e WHERE e.event_id = a.event_id)
"""


class _JournalBehind(Exception):
    pass


async def _not_journaled(conn: asyncpg.Connection, projection: Projection) -> asyncpg.Record:
    return await conn.fetchrow(NOT_JOURNALED, projection.name)


async def _wait_for_journal(conn: asyncpg.Connection, projection: Projection, timeout_s: float) -> None:
    """Wait until the journal holds every event the live projection applied, or abort."""
    deadline = time.monotonic() + timeout_s
    while (behind := await _not_journaled(conn, projection))["missing"]:
        if time.monotonic() > deadline:
            raise ReplayAborted(
                f"{behind['missing']} events the live {projection.name} projection applied are not in the journal "
                f"after {timeout_s:g}s (e.g. {', '.join(map(str, behind['sample']))}); is `sntrack consume journal` "
                "running? Nothing was changed")
        await asyncio.sleep(0.2)


DEPENDENT_VIEWS = """
SELECT DISTINCT v.oid::regclass::text AS name, pg_get_viewdef(v.oid) AS def
FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid JOIN pg_class v ON v.oid = r.ev_class
WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = ANY($1::regclass[]) AND v.oid <> d.refobjid
  AND v.relkind = 'v'
"""

ADD_BOOKKEEPING = """
INSERT INTO applied_events (projection, event_id, applied_at)
SELECT s.projection, s.event_id, s.applied_at FROM {shadow}.applied_events s
WHERE NOT EXISTS (SELECT 1 FROM applied_events a WHERE a.projection = s.projection AND a.event_id = s.event_id)
"""

LIVE_APPLIED = "SELECT count(*) FROM applied_events WHERE projection = $1"


async def _swap(conn: asyncpg.Connection, projection: Projection, live: str, shadow: str, retired: str,
                done: int, journal_wait_s: float, progress: Progress | None) -> tuple[int, float]:
    """Swap the shadow tables in; (events applied in all, seconds the locks were held). Each attempt first
    catches up outside the locks, so what a stream adds while attempts wait is not applied under them."""
    tables = ", ".join(f"{_ident(live)}.{_ident(t)}" for t in projection.tables)
    for attempt in range(SWAP_ATTEMPTS):
        caught_up, floor = await _catch_up(conn, projection, shadow, live, done, progress)
        done += caught_up
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(f"LOCK TABLE {_ident(live)}.{BOOKKEEPING} IN EXCLUSIVE MODE")
                await conn.execute(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE")
                locked = time.perf_counter()
                fresh = await _apply_unapplied(conn, projection, shadow, live, done, progress, above=floor)
                # The shadow now holds every journal event (see _catch_up); as many means nothing left the journal
                # since it was read (a `studies delete --hard`, whose study would otherwise come back).
                rebuilt = await conn.fetchval(f"SELECT count(*) FROM {_ident(shadow)}.{BOOKKEEPING}")
                if await conn.fetchval(JOURNAL_KEPT) != rebuilt:
                    raise ReplayAborted("events left the journal during the rebuild (studies delete --hard?); "
                                        "nothing was changed; run the replay again")
                views = await conn.fetch(DEPENDENT_VIEWS, [f"{_ident(live)}.{_ident(t)}" for t in projection.tables])
                await conn.execute(f"CREATE SCHEMA {_ident(retired)}")
                for table in projection.tables:
                    await conn.execute(f"ALTER TABLE {_ident(live)}.{_ident(table)} SET SCHEMA {_ident(retired)}")
                    await conn.execute(f"ALTER TABLE {_ident(shadow)}.{_ident(table)} SET SCHEMA {_ident(live)}")
                for view in views:
                    await conn.execute(f"CREATE OR REPLACE VIEW {view['name']} AS {view['def']}")
                await conn.execute(ADD_BOOKKEEPING.format(shadow=_ident(shadow)))
                # The bookkeeping is now live + shadow: as many as the shadow's exactly when every event the live
                # projection applied is in the shadow. Else one is not journaled yet and its effect would be lost.
                if await conn.fetchval(LIVE_APPLIED, projection.name) != rebuilt:
                    raise _JournalBehind
            return done + fresh, time.perf_counter() - locked
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            await asyncio.sleep(random.uniform(0.05, 0.05 * min(attempt + 1, 10)))
        except _JournalBehind:
            await _wait_for_journal(conn, projection, journal_wait_s)
    raise ReplayAborted(f"the swap of {projection.name} did not get its locks in {SWAP_ATTEMPTS} tries of "
                        f"{LOCK_TIMEOUT}; a long transaction holds them? Nothing was changed")


async def _next_page(pages: asyncio.Queue, reading: asyncio.Task) -> list | None:
    """The next page, or the reader's exception if it failed before producing one."""
    getter = asyncio.ensure_future(pages.get())
    await asyncio.wait({getter, reading}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    reading.result()  # raises the reader's error
    raise RuntimeError("journal reader stopped before the end of the journal")


def default_schema(until: datetime) -> str:
    """The schema an as-of rebuild writes to when none is named: asof_YYYYMMDD_HHMMSS (UTC)."""
    return until.astimezone(UTC).strftime("asof_%Y%m%d_%H%M%S")
