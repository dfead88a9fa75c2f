"""PostgreSQL access: connecting with clear errors, migrations, and applying projections exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import Iterable, Sequence
from importlib.resources import files
from typing import TYPE_CHECKING

import asyncpg

from common.errors import ConfigurationError
from common.tls import certificate_problem
from common.urls import redact
from consumers.stages import mark

if TYPE_CHECKING:  # pools of read-only commands (`sntrack report`) need not build the event models
    from consumers.projections.base import Projection, Statement
    from schemas import Event

MIGRATION_LOCK = 0x5E7AC4  # advisory lock id: one migrator at a time
READ_MODEL_CHANNEL = "sntrack_read_model"  # NOTIFY channel: a projection committed new events (the dashboard)
RESTART_WAIT_S = 30.0  # how long a new pool waits for a PostgreSQL that said it is starting up or shutting down
NOTIFY_LIMIT = 7900  # PostgreSQL refuses payloads of 8000 bytes or more

# Errors that mean "the database is away or the transaction lost a race": retry the batch later.
TRANSIENT_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.TooManyConnectionsError,
)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """sntrack keeps no session state on pooled connections (only transaction-scoped locks, no LISTEN or SET),
    so a returned connection needs no reset query: one round trip less per consumer batch."""


async def create_pool(database_url: str, *, min_size: int = 1, max_size: int = 4,
                      variable: str = "SNTRACK_DATABASE_URL") -> asyncpg.Pool:
    """A pool on `database_url`; its errors are one line naming `variable`, the setting the URL came from.

    A server that answers "starting up" or "shutting down" is restarting: it is waited for, through the refused
    connections of the restart itself, for up to RESTART_WAIT_S
    (tests/test_pool_restart.py::test_a_pool_waits_for_a_server_that_is_restarting)."""
    deadline = time.monotonic() + RESTART_WAIT_S
    restarting = False
    while True:
        try:
            return await _create_pool(database_url, min_size, max_size, variable)
        except asyncpg.CannotConnectNowError as exc:
            restarting = True
            if time.monotonic() > deadline:
                raise ConfigurationError(f"PostgreSQL at {redact(database_url)} is still restarting after "
                                         f"{RESTART_WAIT_S:.0f} s ({exc})") from None
        except ConfigurationError:
            if not restarting or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


async def _create_pool(database_url: str, min_size: int, max_size: int, variable: str) -> asyncpg.Pool:
    try:
        return await asyncpg.create_pool(database_url, min_size=min_size, max_size=max_size, timeout=10,
                                         reset=_keep_session)
    except asyncpg.InvalidCatalogNameError:
        raise ConfigurationError(
            f"database in {redact(database_url)} does not exist; create it (createdb) or run `sntrack db migrate "
            "--create`"
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as exc:  # wrong password, unknown role, pg_hba refusal
        raise ConfigurationError(
            f"PostgreSQL refused the login in {redact(database_url)}: {exc}; check {variable}") from None
    except ssl.SSLCertVerificationError as exc:  # an OSError too: before the next clause
        raise ConfigurationError(
            f"refusing PostgreSQL at {redact(database_url)}: {certificate_problem(exc)}; check sslrootcert= (the "
            f"CA's certificate) and the host name in {variable}") from None
    except (TimeoutError, OSError) as exc:
        raise ConfigurationError(
            f"cannot reach PostgreSQL at {redact(database_url)} ({exc}); is it running? set {variable}"
        ) from None


def migration_files() -> list[tuple[str, str]]:
    folder = files("consumers") / "sql"
    return sorted((f.name, f.read_text()) for f in folder.iterdir() if f.name.endswith(".sql"))


async def migrate(conn: asyncpg.Connection, extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Apply the SQL files not yet recorded in schema_migrations, each in its own transaction, then `extra`
    (version, SQL) pairs: the projection plugins' migrations (consumers.plugins)."""
    applied = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version text PRIMARY KEY, checksum text NOT NULL, "
            "applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        done = {r["version"]: r["checksum"] for r in rows}
        for name, sql in [*migration_files(), *extra]:
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != checksum:
                    raise ConfigurationError(f"migration {name} changed after it was applied; add a new file instead")
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)", name, checksum)
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied


async def run_statements(conn: asyncpg.Connection, statements: Iterable[Statement]) -> None:
    """Run statements grouped by SQL text (one pipelined executemany per group), first-seen order."""
    groups: dict[str, list[tuple]] = {}
    for sql, args in statements:
        groups.setdefault(sql, []).append(args)
    for sql, rows in groups.items():
        await conn.executemany(sql, rows)


# A batch's events as rows: $2 their ids, $3 their studies, $4 their trials (aligned arrays).
_BATCH = "batch AS (SELECT * FROM unnest($2::uuid[], $3::text[], $4::text[]) AS b(event_id, model_run_id, trial_id))"
# The studies of the batch removed for good (a tombstone in deleted_studies): `new` never holds their events.
_GONE = "gone AS (SELECT model_run_id FROM deleted_studies WHERE model_run_id = ANY($3::text[]))"
_NOT_GONE = "model_run_id NOT IN (SELECT model_run_id FROM gone)"
# The NOTIFY the dashboard listens for, sent by the bookkeeping statement itself rather than a round trip of its own
# (PostgreSQL delivers it at commit): the projection ($1) and the trials its new events (`new`) changed, or null
# when too many to list (a listener then rereads everything). No new event, no NOTIFY.
_NOTICE = f"""changed AS (
    SELECT DISTINCT b.trial_id FROM batch b JOIN new USING (event_id)
), listed AS (
    SELECT json_build_object('projection', $1::text,
                             'trials', json_agg(trial_id ORDER BY trial_id COLLATE "C"))::text AS payload
    FROM changed HAVING count(*) > 0
), notice AS (
    SELECT CASE WHEN octet_length(payload) < {NOTIFY_LIMIT} THEN payload
                ELSE json_build_object('projection', $1::text, 'trials', NULL)::text END AS payload
    FROM listed
)"""
# The statement's rows: the new events' ids (and a NULL when the NOTIFY was sent).
_ROWS = "SELECT event_id FROM new"
_SEND = f"UNION ALL SELECT NULL FROM notice, pg_notify('{READ_MODEL_CHANNEL}', notice.payload) AS sent"

# The "already applied" bookkeeping of every consumer, in one statement with the tombstones of studies removed for
# good. Recording: studies.hard_delete takes an EXCLUSIVE lock on applied_events; the INSERT waits for it, and its
# snapshot, taken after the lock, then sees the tombstone. A removed study's late event gets no row: the journal
# never holds it, and replay's swap would wait for the journal to hold every event a projection has a row for
# (tests/test_studies.py::test_late_events_of_a_deleted_study_are_ignored).
_RECORD = f"""WITH {_BATCH}, {_GONE}, new AS (
    INSERT INTO applied_events (projection, event_id)
    SELECT $1, event_id FROM batch WHERE {_NOT_GONE}
    ON CONFLICT DO NOTHING RETURNING event_id
)"""
RECORD_APPLIED = f"{_RECORD}\n{_ROWS}"
RECORD_AND_NOTIFY = f"{_RECORD}, {_NOTICE}\n{_ROWS}\n{_SEND}"

# "on" while `sntrack replay` writes a projection's shadow tables (consumers/replay.py), their only writer.
WRITING_SHADOW = "sntrack.writing_shadow"
# Projection.locks_trials: the bookkeeping statement also takes each of the batch's trials' advisory lock (the
# two-key form: the MLflow consumer's one-key locks are other keys), in trial order so that two daemons' batches
# never deadlock over them, and none while a replay writes its shadow. PostgreSQL evaluates a volatile function in
# the select list after the ORDER BY's sort.
TRIAL_LOCK_CLASS = 1936618612  # b"sntt"
_LOCKS = f"""locks AS (
    SELECT pg_advisory_xact_lock({TRIAL_LOCK_CLASS}, hashtext(trial_id)) FROM (SELECT DISTINCT trial_id FROM batch) t
    WHERE current_setting('{WRITING_SHADOW}', true) IS DISTINCT FROM 'on' ORDER BY trial_id COLLATE "C"
)"""
RECORD_LOCK_AND_NOTIFY = (f"{_RECORD}, {_NOTICE}, {_LOCKS}\n{_ROWS} WHERE (SELECT count(*) FROM locks) >= 0\n"
                          f"{_SEND}")
# A projection that dedupes itself (Projection.dedupes_itself: the journal) records nothing, but its transaction
# takes, as a recording INSERT would, applied_events' ROW EXCLUSIVE lock, so that studies.hard_delete orders it
# the same way, and a transaction id before its first write (replay's fence: consumers.replay._catch_up). Every
# event of the batch counts as new: its own writes skip what they already hold.
HOLD_AND_NOTIFY = f"""WITH {_BATCH}, hold AS (
    INSERT INTO applied_events (projection, event_id) SELECT NULL, NULL WHERE false RETURNING 1
), {_GONE}, new AS (
    SELECT DISTINCT event_id FROM batch WHERE pg_current_xact_id() IS NOT NULL AND {_NOT_GONE}
), {_NOTICE}
{_ROWS}
{_SEND}"""
READ_UNAPPLIED = f"""WITH {_BATCH}, {_GONE}, new AS (
    SELECT event_id FROM batch b
    WHERE {_NOT_GONE}
      AND NOT EXISTS (SELECT 1 FROM applied_events a WHERE a.projection = $1 AND a.event_id = b.event_id)
)
{_ROWS}"""


async def _fresh(conn: asyncpg.Connection, sql: str, consumer: str, events: Sequence[Event]) -> list[Event]:
    """The events whose ids `sql` (one of the statements above) returns as new, each once, in their order."""
    rows = await conn.fetch(sql, consumer, [e.event_id for e in events], [e.model_run_id for e in events],
                            [e.trial_id for e in events])
    found = {row["event_id"] for row in rows}
    kept = []
    for event in events:
        if event.event_id in found:
            found.discard(event.event_id)  # a duplicate inside the same batch counts once
            kept.append(event)
    return kept


async def unapplied(conn: asyncpg.Connection, consumer: str, events: Sequence[Event], *, record: bool) -> list[Event]:
    """The events `consumer` has not applied before, each once, in their order, leaving out those of a study removed
    for good (a tombstone in deleted_studies), so a late event never brings the study back
    (tests/test_studies.py::test_late_events_of_a_deleted_study_are_ignored). One round trip.

    record=True also records all of `events` as applied: call it inside the transaction that makes their writes.
    record=False only reads: a consumer whose effect lies outside PostgreSQL (MLflow) reads first, acts, then
    records with record=True."""
    return await _fresh(conn, RECORD_APPLIED if record else READ_UNAPPLIED, consumer, events)


async def apply_events(conn: asyncpg.Connection, projection: Projection, events: Sequence[Event]) -> int:
    """Inside the caller's transaction: record the events as applied by `projection` and run the writes of
    those not applied before. Returns how many were new (for a projection that dedupes itself, how many it was
    given, a study removed for good left out: its own writes skip what they already hold).

    The statement that records them also sends the NOTIFY naming the trials they changed, delivered only if the
    transaction commits (tests/test_dashboard.py::test_projections_notify_only_when_their_transaction_commits)."""
    sql = (HOLD_AND_NOTIFY if projection.dedupes_itself
           else RECORD_LOCK_AND_NOTIFY if projection.locks_trials else RECORD_AND_NOTIFY)
    new_events = await _fresh(conn, sql, projection.name, events)
    mark("recorded")
    await run_statements(conn, (s for e in new_events for s in projection.project(e)))
    mark("projected")
    return len(new_events)


class Store:
    """Applies batches of events to a projection: one transaction per batch, rows and bookkeeping together."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def apply(self, projection: Projection, events: Sequence[Event]) -> int:
        async with self.pool.acquire() as conn:
            mark("acquired")
            async with conn.transaction():
                mark("begun")
                applied = await apply_events(conn, projection, events)
            mark("committed")
            return applied
