"""Database roles by job (issue 10): a writer for the daemons, a SELECT-only reader, and the tables' owner.

- The owner (whoever runs `sntrack db migrate`, SNTRACK_ADMIN_DATABASE_URL) owns every table: migrations, replay
  (it creates and swaps tables), `studies delete --hard` (deletes from the journal), archive/restore and gateway
  tokens. It needs no superuser: owning the database (and CREATEROLE for `--roles`) is enough.
- The writer (SNTRACK_DATABASE_URL of the daemons: consume, subscribe, gateway) gets exactly the DML the daemons
  run, table by table (WRITER_GRANTS); no DELETE on the journal, no TRUNCATE, no DDL.
- The reader (SNTRACK_READ_DATABASE_URL: report, export, trial, studies list/show, reconcile, the dashboard) gets
  SELECT on every table and view but gateway_tokens.

`ensure_roles` creates or updates both roles and re-applies their grants from scratch (revoke all, grant the
list), so running it after every migration keeps the grants in step with the schema. Roles are cluster-wide, the
grants are per database. A replay copies the live tables' grants to the tables it swaps in (consumers/replay.py),
so the roles keep working after it (tests/test_db_roles.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

import asyncpg

from common.errors import ConfigurationError
from consumers.replay import _ident

SELECT, WRITE, UPSERT = ("SELECT",), ("SELECT", "INSERT"), ("SELECT", "INSERT", "UPDATE")
# What the daemons do, table by table (consumers/projections, consumers/persistence, consumers/mlflow/sync.py,
# consumers/attempts.py, consumers/catchup.py, gateway/tokens.py).
WRITER_GRANTS: dict[str, tuple[str, ...]] = {
    "events": WRITE,               # the journal appends; UPDATE/DELETE stay the owner's (hard delete)
    # Exactly-once bookkeeping, ON CONFLICT DO NOTHING; DELETE prunes the rows of idempotently applied events
    # (consumers/pruning.py). It adds nothing a writer could not do already: it may rewrite every read-model row.
    "applied_events": (*WRITE, "DELETE"),
    "trials": UPSERT,
    "trial_metrics": UPSERT,
    "sn_comparison": UPSERT,
    "mlflow_runs": UPSERT,         # the mlflow consumer's links (and reconcile --repair)
    "consumer_attempts": (*UPSERT, "DELETE"),
    "subscriber_positions": UPSERT,  # `sntrack subscribe`: where each catch-up subscriber stands
    "deleted_studies": SELECT,     # tombstones: late events of a removed study are ignored
    "archived_studies": SELECT,
    "gateway_tokens": SELECT,      # the gateway checks tokens; adding and revoking them is the owner's
    "trial_mlflow_runs": SELECT,   # view
}
OWNER_ONLY = ("schema_migrations", "study_audit")  # the writer gets nothing on these
NOT_READABLE = ("gateway_tokens",)  # the reader needs no token digests

RELATIONS = """
SELECT c.relname FROM pg_class c
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm') ORDER BY 1
"""
# Sequences behind serial columns of the tables the writer inserts into (events.position).
SEQUENCES = """
SELECT s.relname FROM pg_class s JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = s.oid
JOIN pg_class t ON t.oid = d.refobjid
WHERE s.relkind = 'S' AND s.relnamespace = current_schema()::regnamespace AND t.relname = ANY($1::text[])
"""


@dataclass(frozen=True)
class RoleSpec:
    name: str
    password: str | None  # None or empty: not set (an existing role keeps its password)
    password_variable: str  # where the password comes from, for error messages


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (RFC 5802, as libpq's PQencryptPasswordConn):
    sent instead of the password, which then never reaches the server's statement log."""
    salt = os.urandom(16) if salt is None else salt
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(hmac.new(salted, b"Client Key", hashlib.sha256).digest()).digest()
    server = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored).decode()}:{b64(server).decode()}"


async def is_superuser(conn: asyncpg.Connection) -> tuple[str, bool]:
    """(the session's role, whether it is a superuser)."""
    row = await conn.fetchrow("SELECT current_user AS name, current_setting('is_superuser') = 'on' AS super")
    return row["name"], row["super"]


async def ensure_roles(conn: asyncpg.Connection, writer: RoleSpec, reader: RoleSpec,
                       plugin_tables: tuple[str, ...] = ()) -> list[str]:
    """Create or update the two roles and set their grants, in one transaction; a line per role saying what was
    done. Run as the tables' owner. `plugin_tables`: the projection plugins' tables, which the writer upserts."""
    me = await conn.fetchval("SELECT current_user")
    if writer.name == reader.name:
        raise ConfigurationError(f"the writer and the reader role are both named {writer.name!r}; name them apart")
    if me in (writer.name, reader.name):
        raise ConfigurationError(f"{me!r} runs the migration and cannot also be the writer or reader role; run it "
                                 "as the tables' owner (SNTRACK_ADMIN_DATABASE_URL)")
    async with conn.transaction():
        done = [await _ensure_login(conn, role) for role in (writer, reader)]
        relations = [r["relname"] for r in await conn.fetch(RELATIONS)]
        grants = {**WRITER_GRANTS, **{t: UPSERT for t in plugin_tables}}
        await _grant(conn, writer.name, {t: p for t, p in grants.items() if t in relations})
        await _grant(conn, reader.name, {t: SELECT for t in relations if t not in NOT_READABLE})
        sequences = [r["relname"] for r in await conn.fetch(
            SEQUENCES, [t for t, p in grants.items() if "INSERT" in p])]
        for sequence in sequences:
            await conn.execute(f"GRANT USAGE ON SEQUENCE {_ident(sequence)} TO {_ident(writer.name)}")
    return done


async def _ensure_login(conn: asyncpg.Connection, role: RoleSpec) -> str:
    found = await conn.fetchrow("SELECT rolsuper FROM pg_roles WHERE rolname = $1", role.name)
    password = "" if not role.password else f" PASSWORD '{scram_verifier(role.password)}'"
    if found is None:
        if not role.password:
            raise ConfigurationError(f"role {role.name} does not exist and {role.password_variable} is not set; set "
                                     "it to create the role with that password")
        await conn.execute(f"CREATE ROLE {_ident(role.name)} LOGIN{password}")
        return f"{role.name} created"
    if found["rolsuper"]:
        raise ConfigurationError(f"role {role.name} is a superuser; a daemon's role must not be: name another role "
                                 "or make it NOSUPERUSER")
    await conn.execute(f"ALTER ROLE {_ident(role.name)} LOGIN{password}")
    return f"{role.name} updated" + (" (new password)" if role.password else " (password kept)")


async def _grant(conn: asyncpg.Connection, role: str, grants: dict[str, tuple[str, ...]]) -> None:
    """Exactly `grants` on the current schema's tables for `role`: what it had before is revoked first."""
    who = _ident(role)
    await conn.execute(f"GRANT CONNECT ON DATABASE {_ident(await conn.fetchval('SELECT current_database()'))} "
                       f"TO {who}")
    schema = _ident(await conn.fetchval("SELECT current_schema()"))
    await conn.execute(f"GRANT USAGE ON SCHEMA {schema} TO {who}")
    await conn.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {who}")
    await conn.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA {schema} FROM {who}")
    for table, privileges in grants.items():
        await conn.execute(f"GRANT {', '.join(privileges)} ON {schema}.{_ident(table)} TO {who}")
