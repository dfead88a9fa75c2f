"""Database roles by job (issue 10), against the real server: a production-like database owned by a non-superuser
owner role, a writer role the daemons run as and a SELECT-only reader, all set up by `sntrack db migrate --roles`.

Roles are cluster-wide: every role here is named after the test's own database and dropped at teardown."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from common.postgres import drop_database
from common.urls import with_path
from consumers.mlflow.sync import UPSERT_LINK
from consumers.replay import _ident
from consumers.roles import OWNER_ONLY, WRITER_GRANTS, scram_verifier
from consumers.studies import hard_delete
from producer.emitter import producer_info
from producer.sample import synthetic_study
from sntrack.settings import Settings
from tests.conftest import applied_sql, wait_until

if TYPE_CHECKING:
    from tests.conftest import TestEnv

PROJECTIONS = ("journal", "trials", "comparison")
REFUSED = asyncpg.InsufficientPrivilegeError


def _as(url: str, role: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{role}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Prod:
    """A database owned by `owner` (LOGIN CREATEROLE, no superuser) and the settings of a production set-up."""

    def __init__(self, env: TestEnv):
        self.env = env
        base = env.database
        self.database = f"{base}_prod"
        self.owner, self.writer, self.reader = f"{base}_owner", f"{base}_writer", f"{base}_reader"
        self.passwords = {role: f"{role[-6:]}-pw-{os.urandom(6).hex()}" for role in (self.writer, self.reader)}
        url = with_path(env.settings.database_url, self.database)
        self.owner_url = _as(url, self.owner, "owner-pw")
        self.writer_url = _as(url, self.writer, self.passwords[self.writer])
        self.reader_url = _as(url, self.reader, self.passwords[self.reader])
        self.settings: Settings = env.settings.replace(
            database_url=self.writer_url, read_database_url=self.reader_url, admin_database_url=self.owner_url,
            db_writer_role=self.writer, db_reader_role=self.reader, db_writer_password=self.passwords[self.writer],
            db_reader_password=self.passwords[self.reader])

    def environ(self, **extra: str) -> dict[str, str]:
        return {**os.environ, **self.settings.to_env(), "SNTRACK_LOG_JSON": "true", **extra}

    def sntrack(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sntrack", *args], env=self.environ(**extra),
                              capture_output=True, text=True, timeout=300)

    async def connect(self, url: str) -> asyncpg.Connection:
        return await asyncpg.connect(url)

    async def value(self, url: str, sql: str, *args):
        conn = await self.connect(url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


async def _superuser(env: TestEnv, database: str, sql: str) -> None:
    conn = await asyncpg.connect(with_path(env.settings.database_url, database))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def prod(env) -> Prod:
    p = Prod(env)
    await _superuser(env, env.database, f'CREATE ROLE "{p.owner}" LOGIN CREATEROLE')
    try:
        await _superuser(env, env.database, f'CREATE DATABASE "{p.database}" OWNER "{p.owner}"')
        run = p.sntrack("db", "migrate", "--roles")
        assert run.returncode == 0, run.stderr
        assert run.stdout.splitlines()[-1] == (f"roles: {p.writer} created; {p.reader} created; grants set"), run.stdout
        yield p
    finally:
        await asyncio.to_thread(drop_database, p.owner_url)
        for role in (p.writer, p.reader, p.owner):  # privileges on shared objects go with DROP OWNED
            await _superuser(env, "postgres", f'DO $$ BEGIN IF EXISTS (SELECT FROM pg_roles WHERE rolname = '
                             f"'{role}') THEN EXECUTE 'DROP OWNED BY \"{role}\"'; END IF; END $$; "
                             f'DROP ROLE IF EXISTS "{role}"')


async def _stored_verifier(env: TestEnv, role: str) -> str:
    return await env.fetchval("SELECT rolpassword FROM pg_authid WHERE rolname = $1", role)


def _verifies(stored: str, password: str) -> bool:
    """Whether `stored` is the SCRAM verifier of `password` (recomputed with its salt and iterations)."""
    iterations, salt = stored.removeprefix("SCRAM-SHA-256$").split("$")[0].split(":")
    return scram_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations)) == stored


async def test_migrate_roles_by_a_non_superuser_owner_is_idempotent_and_stores_only_verifiers(prod, env):
    for role in (prod.writer, prod.reader):
        row = (await env.fetch("SELECT rolcanlogin, rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                               "WHERE rolname = $1", role))[0]
        assert tuple(row) == (True, False, False, False), role
        assert _verifies(await _stored_verifier(env, role), prod.passwords[role])
    kept = prod.sntrack("db", "migrate", "--roles", SNTRACK_DB_WRITER_PASSWORD="", SNTRACK_DB_READER_PASSWORD="")
    assert kept.returncode == 0, kept.stderr
    assert kept.stdout.splitlines() == ["schema is up to date", f"roles: {prod.writer} updated (password kept); "
                                        f"{prod.reader} updated (password kept); grants set"]
    assert _verifies(await _stored_verifier(env, prod.writer), prod.passwords[prod.writer])
    changed = prod.sntrack("db", "migrate", "--roles", SNTRACK_DB_WRITER_PASSWORD="another-writer-pw")
    assert changed.returncode == 0, changed.stderr
    assert _verifies(await _stored_verifier(env, prod.writer), "another-writer-pw")
    for run in (kept, changed):
        assert not any(p in run.stdout + run.stderr for p in (*prod.passwords.values(), "another-writer-pw"))


async def test_role_mistakes_are_one_line(prod):
    cases: list[tuple[dict[str, str], str]] = [
        ({"SNTRACK_DB_WRITER_ROLE": prod.writer + "_new", "SNTRACK_DB_WRITER_PASSWORD": ""},
         f"role {prod.writer}_new does not exist and SNTRACK_DB_WRITER_PASSWORD is not set"),
        ({"SNTRACK_DB_WRITER_ROLE": "postgres"}, "role postgres is a superuser"),
        ({"SNTRACK_DB_READER_ROLE": prod.writer}, "are both named"),
        ({"SNTRACK_ADMIN_DATABASE_URL": prod.writer_url}, f"`sntrack db migrate` as {prod.writer} was refused"),
    ]
    for extra, said in cases:
        run = prod.sntrack("db", "migrate", "--roles", **extra)
        assert run.returncode == 2 and said in run.stderr, (extra, run.stderr)
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert not await prod.value(prod.owner_url, "SELECT count(*) FROM pg_roles WHERE rolname = $1",
                                prod.writer + "_new")  # nothing half-done
    # An owner's command run with the writer's login: refused by the server, said in one line.
    for args in (("replay", "trials"), ("gateway", "token", "add", "someone")):
        run = prod.sntrack(*args, SNTRACK_ADMIN_DATABASE_URL=prod.writer_url)
        assert run.returncode == 2 and "PostgreSQL refused: permission denied" in run.stderr, (args, run.stderr)
        assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


async def _refusals(url: str, statements: list[str]) -> list[str]:
    """The statements the server did NOT refuse with insufficient_privilege (each in its own rolled-back try)."""
    conn = await asyncpg.connect(url)
    allowed = []
    try:
        for sql in statements:
            try:
                async with conn.transaction():
                    await conn.execute(sql)
                allowed.append(sql)
            except REFUSED:
                pass
    finally:
        await conn.close()
    return allowed


async def test_the_reader_may_only_select(prod):
    conn = await prod.connect(prod.reader_url)
    try:
        relations = [r["relname"] for r in await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v')")]
        for relation in relations:
            if relation != "gateway_tokens":
                await conn.fetchval(f"SELECT count(*) FROM {relation}")  # raises if refused
    finally:
        await conn.close()
    assert await _refusals(prod.reader_url, [
        "INSERT INTO trials (id, model_run_id, inserted_at, updated_at) VALUES ('x', 'x', now(), now())",
        "UPDATE trials SET status = 'failed'",
        "DELETE FROM trials",
        "INSERT INTO applied_events (projection, event_id) VALUES ('trials', gen_random_uuid())",
        "DELETE FROM sn_comparison",
        "INSERT INTO archived_studies (model_run_id, archived_by) VALUES ('x', 'me')",
        "UPDATE mlflow_runs SET status = 'failed'",
        "SELECT * FROM gateway_tokens",
        "CREATE TABLE sneaky (a int)",
        "TRUNCATE trials",
    ]) == []


async def test_the_writer_cannot_change_the_schema_or_rewrite_history(prod):
    assert await _refusals(prod.writer_url, [
        "DROP TABLE trials",
        "ALTER TABLE trials ADD COLUMN sneaky int",
        "CREATE TABLE sneaky (a int)",
        "CREATE SCHEMA sneaky",
        "TRUNCATE trials",
        "TRUNCATE events",
        "DELETE FROM events",
        "UPDATE events SET seq = 0",
        "DELETE FROM trials",
        "DELETE FROM deleted_studies",
        "INSERT INTO deleted_studies (model_run_id) VALUES ('x')",
        "INSERT INTO archived_studies (model_run_id, archived_by) VALUES ('x', 'me')",
        "INSERT INTO study_audit (model_run_id, action, actor) VALUES ('x', 'delete', 'me')",
        "INSERT INTO gateway_tokens (id, producer_id, secret_sha256) VALUES ('t', 'p', sha256('x'))",
        "UPDATE gateway_tokens SET revoked_at = now()",
        "DELETE FROM schema_migrations",
        "CREATE OR REPLACE VIEW trial_mlflow_runs AS SELECT 1",
    ]) == []


async def test_every_table_has_a_decided_writer_grant(prod):
    """A migration that adds a table must say what the writer may do on it (consumers/roles.py)."""
    relations = {r for r in (await prod.value(prod.owner_url, "SELECT array_agg(relname) FROM pg_class WHERE "
                                              "relnamespace = 'public'::regnamespace AND relkind IN ('r', 'v')"))}
    assert relations == set(WRITER_GRANTS) | set(OWNER_ONLY)


def _daemon(prod: Prod) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "consume", *PROJECTIONS], env=prod.environ(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _applied(prod: Prod, events) -> Callable:
    """A predicate: every projection applied every one of `events` (the comparison: the stops)."""
    async def check() -> bool:
        for name in PROJECTIONS:
            ids = [e.event_id for e in events if name != "comparison" or e.event_type == "ml.run.stop"]
            if await prod.value(prod.owner_url, applied_sql(name), name, ids) != len(ids):
                return False
        return True
    return check


async def test_daemons_run_as_the_writer_reports_as_the_reader_and_a_replay_keeps_both_working(prod, env):
    first = [e for t in synthetic_study(6, 3, producer=producer_info(), model_run_id="before", seed=1) for e in t]
    later = [e for t in synthetic_study(4, 3, producer=producer_info(), model_run_id="after", seed=2) for e in t]
    daemon = _daemon(prod)
    try:
        await env.publish_events(first)
        await wait_until(_applied(prod, first), timeout=90, what="the writer's daemon to apply the first study")
        status = prod.sntrack("status")
        assert status.returncode == 0, status.stderr
        assert "superuser" not in status.stdout and "journal: " in status.stdout

        # The owner rebuilds and swaps the tables beside the daemon; a superuser's replay keeps the owner too.
        superuser = with_path(env.settings.database_url, prod.database)
        for name, admin in (("trials", prod.owner_url), ("comparison", superuser)):
            replayed = prod.sntrack("replay", name, SNTRACK_ADMIN_DATABASE_URL=admin)
            assert replayed.returncode == 0, replayed.stderr
        owners = await prod.value(prod.owner_url, "SELECT array_agg(DISTINCT pg_get_userbyid(relowner)) FROM pg_class "
                                  "WHERE relname IN ('trials', 'trial_metrics', 'sn_comparison') "
                                  "AND relnamespace = 'public'::regnamespace")
        assert owners == [prod.owner]

        await env.publish_events(later)  # the daemon writes into the swapped-in tables
        await wait_until(_applied(prod, later), timeout=90, what="the writer's daemon to apply after the replay")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0 and "permission denied" not in stderr, stderr[-2000:]
    assert await prod.value(prod.reader_url, "SELECT count(*) FROM trials") == 10

    # The owner builds a past state beside the live tables (time travel); the reader reports from it.
    past = prod.sntrack("replay", "trials", "--until", "2100-01-01T00:00:00Z", "--into", "monday",
                        SNTRACK_ADMIN_DATABASE_URL=prod.owner_url)
    assert past.returncode == 0, past.stderr

    # Read-only commands touch only the reader's URL: the daemons' one is made unusable.
    nowhere = {"SNTRACK_DATABASE_URL": _as(prod.writer_url, "no_such_role", "x")}
    for args in (("report", "--run", "after"), ("export", "--run", "after"), ("studies", "list"),
                 ("report", "--run", "after", "--schema", "monday")):
        run = prod.sntrack(*args, **nowhere)
        assert run.returncode == 0, (args, run.stderr)
    assert "after" in prod.sntrack("studies", "list", **nowhere).stdout

    # The mlflow consumer's link (also reconcile --repair) and the attempt ledger, as the writer.
    conn = await prod.connect(prod.writer_url)
    try:
        trial = later[0].trial_id
        await conn.execute(UPSERT_LINK, trial, "run-1", "exp-1", "created", "running")
        await conn.execute("INSERT INTO consumer_attempts (consumer, message_key, attempts) VALUES ('t', 'k', 1)")
        await conn.execute("DELETE FROM consumer_attempts WHERE consumer = 't'")
        await conn.fetch("SELECT producer_id FROM gateway_tokens")  # the gateway daemon checks tokens
    finally:
        await conn.close()

    # The owner (no superuser) removes a study for good.
    conn = await prod.connect(prod.owner_url)
    try:
        deletion = await hard_delete(conn, "before", "test")
    finally:
        await conn.close()
    assert deletion.counts["events"] == len(first)


async def test_role_names_postgresql_reserves_or_cannot_hold_are_one_line_and_create_nothing(prod, env):
    """SNTRACK_DB_*_ROLE = public, none or pg_* was an asyncpg ReservedNameError traceback; 63 characters of more
    than 63 bytes a NameTooLongError traceback; a control character or a quote made a role no URL names easily."""
    long = prod.writer[:20] + "é" * 40
    stray = "SELECT rolname FROM pg_roles WHERE rolname LIKE $1 AND rolname NOT IN ($2, $3, $4)"
    try:
        for name in ("public", "none", "pg_sntrack", long, prod.writer[:30] + "a\x01b", prod.writer[:30] + 'x"; --'):
            run = prod.sntrack("db", "migrate", "--roles", SNTRACK_DB_WRITER_ROLE=name)
            assert run.returncode == 2 and run.stderr.count("\n") == 1 and "SNTRACK_DB_WRITER_ROLE" in run.stderr, (
                name, run.stderr[-1500:])
    finally:  # what a failing run created, removed (role names are cluster-wide)
        made = [r["rolname"] for r in await env.fetch(stray, prod.writer[:20] + "%", prod.writer, prod.reader,
                                                        prod.owner)]
        for role in made:
            await _superuser(env, prod.database, f"DROP OWNED BY {_ident(role)}; DROP ROLE {_ident(role)}")
    assert made == []
