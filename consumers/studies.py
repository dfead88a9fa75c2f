"""Studies (searches, `model_run_id`) as objects: list them, archive and restore them, remove them for good.

A hard delete is the journal's one exception to append-only (migration 006): in one transaction it removes the
study's events, every projection row derived from them and their bookkeeping, leaves a tombstone so that late
events are ignored, and records who removed what in study_audit."""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from datetime import datetime

import asyncpg

from schemas.events import ALL_SEARCHES

# Tables a hard delete must not empty by their model_run_id / trial_id columns: the journal and its bookkeeping are
# handled first, the study tables keep the record of the deletion.
OWN_TABLES = ("events", "applied_events", "archived_studies", "deleted_studies", "study_audit", "schema_migrations")


class UnknownStudy(LookupError):
    """No study of that name; the message lists close matches."""


@dataclass
class StudySummary:
    name: str
    dataset: str | None
    by_arm: dict[str, dict[str, int]]  # "sn" / "baseline" → status → trials
    created: datetime
    last_activity: datetime
    archived: bool


@dataclass
class Deletion:
    study: str
    counts: dict[str, int] = field(default_factory=dict)
    mlflow_run_ids: list[str] = field(default_factory=list)
    audit_id: int = 0


async def study_names(conn: asyncpg.Connection) -> list[str]:
    """Every study the journal or the read model knows, tombstoned ones excepted."""
    rows = await conn.fetch("SELECT model_run_id FROM trials UNION SELECT model_run_id FROM events "
                            "EXCEPT SELECT model_run_id FROM deleted_studies ORDER BY 1")
    return [r["model_run_id"] for r in rows]


async def resolve(conn: asyncpg.Connection, name: str) -> str:
    """`name` when a study has it; otherwise UnknownStudy naming the closest names
    (tests/test_studies.py::test_unknown_study_lists_close_matches)."""
    names = await study_names(conn)
    if name in names:
        return name
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else (
        f"; known: {', '.join(names[:10])}" if names else "; no study has reached the read model yet")
    raise UnknownStudy(f"no study named {name!r}{hint} (sntrack studies list)")


async def list_studies(conn: asyncpg.Connection, *, include_archived: bool = False) -> list[StudySummary]:
    rows = await conn.fetch("""
        SELECT t.model_run_id, min(t.dataset) AS dataset, t.spectral_norm, t.status, count(*) AS n,
               min(t.inserted_at) AS created, max(t.updated_at) AS last_activity,
               bool_or(a.model_run_id IS NOT NULL) AS archived
        FROM trials t LEFT JOIN archived_studies a USING (model_run_id)
        GROUP BY t.model_run_id, t.spectral_norm, t.status ORDER BY t.model_run_id""")
    studies: dict[str, StudySummary] = {}
    for r in rows:
        s = studies.setdefault(r["model_run_id"], StudySummary(r["model_run_id"], r["dataset"], {}, r["created"],
                                                               r["last_activity"], r["archived"]))
        s.by_arm.setdefault("sn" if r["spectral_norm"] else "baseline", {})[r["status"]] = r["n"]
        s.created = min(s.created, r["created"])
        s.last_activity = max(s.last_activity, r["last_activity"])
    return [s for s in studies.values() if include_archived or not s.archived]


async def archive(conn: asyncpg.Connection, study: str, actor: str) -> bool:
    """Hide `study` from reports; False when it was archived already."""
    async with conn.transaction():
        done = await conn.fetchval("INSERT INTO archived_studies (model_run_id, archived_by) VALUES ($1, $2) "
                                   "ON CONFLICT DO NOTHING RETURNING true", study, actor)
        if done:
            await _audit(conn, study, "archive", actor, {})
    return bool(done)


async def restore(conn: asyncpg.Connection, study: str, actor: str) -> bool:
    """Undo `archive`; False when the study was not archived."""
    async with conn.transaction():
        done = await conn.fetchval("DELETE FROM archived_studies WHERE model_run_id = $1 RETURNING true", study)
        if done:
            await _audit(conn, study, "restore", actor, {})
    return bool(done)


async def hard_delete(conn: asyncpg.Connection, study: str, actor: str, note: str = "") -> Deletion:
    """Remove `study` for good, in one transaction (tests/test_studies.py::test_hard_delete_removes_everything).

    The EXCLUSIVE lock on applied_events waits for consumer transactions in flight and holds new ones back until
    this one commits; they then see the tombstone (consumers.persistence.apply_events)."""
    if study == ALL_SEARCHES:
        raise UnknownStudy(f"{ALL_SEARCHES!r} is the aggregate over all studies, not a study")
    deletion = Deletion(study)
    async with conn.transaction():
        await conn.execute("LOCK TABLE applied_events IN EXCLUSIVE MODE")
        await conn.execute("SELECT set_config('sntrack.hard_delete', $1, true)", study)
        trial_ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM trials WHERE model_run_id = $1 UNION SELECT trial_id FROM events WHERE model_run_id = $1",
            study)]
        deletion.mlflow_run_ids = [r["mlflow_run_id"] for r in await conn.fetch(
            "SELECT DISTINCT mlflow_run_id FROM trial_mlflow_runs WHERE trial_id = ANY($1) "
            "AND mlflow_run_id IS NOT NULL", trial_ids)]
        deletion.counts["applied_events"] = _count(await conn.execute(
            "DELETE FROM applied_events a USING events e WHERE e.event_id = a.event_id AND e.model_run_id = $1",
            study))
        deletion.counts["events"] = _count(await conn.execute("DELETE FROM events WHERE model_run_id = $1", study))
        for table, column in await _derived_tables(conn):
            key = study if column == "model_run_id" else trial_ids
            op = "=" if column == "model_run_id" else "= ANY"
            deletion.counts[table] = _count(await conn.execute(
                f'DELETE FROM "{table}" WHERE "{column}" {op}($1)', key))
        await _recount_overall_comparison(conn)
        await conn.execute("DELETE FROM archived_studies WHERE model_run_id = $1", study)
        await conn.execute("INSERT INTO deleted_studies (model_run_id) VALUES ($1) ON CONFLICT DO NOTHING", study)
        deletion.audit_id = await _audit(conn, study, "delete", actor, deletion.counts, note)
    return deletion


async def record_outside(conn: asyncpg.Connection, deletion: Deletion, counts: dict[str, int], note: str) -> None:
    """Add to the deletion's audit row what was done outside PostgreSQL (Optuna, MLflow) and what was left."""
    await conn.execute("UPDATE study_audit SET counts = counts || $2::jsonb, note = $3 WHERE id = $1",
                       deletion.audit_id, json.dumps(counts), note or None)


async def _derived_tables(conn: asyncpg.Connection) -> list[tuple[str, str]]:
    """Every table of the schema keyed by study or trial (projections, present and future), except OWN_TABLES."""
    rows = await conn.fetch("""
        SELECT c.table_name, min(c.column_name) AS column_name
        FROM information_schema.columns c JOIN information_schema.tables t USING (table_schema, table_name)
        WHERE c.table_schema = current_schema() AND t.table_type = 'BASE TABLE'
          AND c.column_name IN ('model_run_id', 'trial_id') AND NOT (c.table_name = ANY($1))
        GROUP BY c.table_name ORDER BY c.table_name""", list(OWN_TABLES))
    return [(r["table_name"], r["column_name"]) for r in rows]


async def _recount_overall_comparison(conn: asyncpg.Connection) -> None:
    """The comparison's all-studies rows ('*') summed again from the per-study rows that remain: sums and counts
    add, minima and maxima take the extremes, exactly what a replay of the remaining journal gives."""
    columns = [r["column_name"] for r in await conn.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() "
        "AND table_name = 'sn_comparison' ORDER BY ordinal_position")]
    if not columns:
        return
    values = [c if c in ("spectral_norm", "status") else
              f"{'min' if c.endswith('_min') else 'max' if c.endswith('_max') else 'sum'}({c})"
              for c in columns if c != "model_run_id"]
    await conn.execute("DELETE FROM sn_comparison WHERE model_run_id = $1", ALL_SEARCHES)
    await conn.execute(
        f"INSERT INTO sn_comparison (model_run_id, {', '.join(c for c in columns if c != 'model_run_id')}) "
        f"SELECT $1, {', '.join(values)} FROM sn_comparison GROUP BY spectral_norm, status", ALL_SEARCHES)


async def _audit(conn: asyncpg.Connection, study: str, action: str, actor: str, counts: dict, note: str = "") -> int:
    return await conn.fetchval("INSERT INTO study_audit (model_run_id, action, actor, counts, note) "
                       "VALUES ($1, $2, $3 || ' as ' || current_user, $4::jsonb, $5) RETURNING id",
                       study, action, actor, json.dumps(counts), note or None)


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])
