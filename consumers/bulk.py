"""Set-based projection: build a projection's empty tables from the whole journal in a few INSERT … SELECT statements.

Each projection's `bulk` statements read the relation `{journal}` (the events up to a time) and must give exactly the
rows its `project` gives applied in position order:
tests/test_projection_contract.py::test_set_based_replay_equals_the_python_fold_on_hostile_journals compares both on
journals the gate accepted with odd values. PostgreSQL reads the stored jsonb directly, so no event
is parsed or validated in Python: the journal holds only events the gate accepted, written by it.

Stored envelopes keep the version they were accepted at. A projection lists in `bulk_versions` the versions its SQL
reads (upcasting expressed in SQL); a journal holding any other version, or events of a study removed for good, is
replayed through `project` instead (`supports`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import asyncpg

from consumers.projections.base import Projection
from schemas import SCHEMA_VERSIONS

# $1: the time up to which events are replayed (NULL: all). Statements read the journal through {journal}.
JOURNAL = "(SELECT * FROM events j WHERE $1::timestamptz IS NULL OR j.occurred_at <= $1)"

KINDS = """
SELECT event_type, schema_version, count(*) AS n FROM events WHERE $1::timestamptz IS NULL OR occurred_at <= $1
GROUP BY 1, 2
"""
# Events of a study removed for good are recorded as applied and otherwise ignored (persistence.unapplied). The
# journal does not keep them (studies.hard_delete removes them; the tombstone keeps new ones out), so the set-based SQL
# does not filter them: a journal that holds some anyway is replayed through `project`.
TOMBSTONED = "SELECT EXISTS (SELECT 1 FROM deleted_studies d JOIN events e USING (model_run_id))"

RECORD_ALL = """
INSERT INTO applied_events (projection, event_id)
SELECT $2, event_id FROM events WHERE $1::timestamptz IS NULL OR occurred_at <= $1
"""

# Room to sort and hash a whole journal in memory (DISTINCT ON over the metric events).
WORK_MEM = "256MB"


async def supports(conn: asyncpg.Connection, projection: Projection, kinds: Iterable[asyncpg.Record]) -> bool:
    """Whether the projection's set-based SQL reads every (event type, version) in `kinds` (types it does not list
    it ignores, at any version `project` would accept), and the journal holds no event of a deleted study."""
    if not projection.bulk or await conn.fetchval(TOMBSTONED):
        return False
    for kind in kinds:
        known = projection.bulk_versions.get(kind["event_type"],
                                             range(1, SCHEMA_VERSIONS.get(kind["event_type"], 0) + 1))
        if kind["schema_version"] not in known:
            return False
    return True


async def journal_kinds(conn: asyncpg.Connection, until: datetime | None) -> list[asyncpg.Record]:
    """(event_type, schema_version, n) of the journal up to `until`."""
    return await conn.fetch(KINDS, until)


async def project_journal(conn: asyncpg.Connection, projection: Projection, until: datetime | None) -> None:
    """Inside the caller's transaction, whose snapshot must not change between statements (REPEATABLE READ), with
    the projection's empty tables first on search_path: record the journal up to `until` as applied and build the
    projection's rows from it."""
    await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
    await conn.execute(RECORD_ALL, until, projection.name)
    for statement in projection.bulk:
        await conn.execute(statement.replace("{journal}", JOURNAL), until)
