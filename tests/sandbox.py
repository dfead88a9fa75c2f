"""A throw-away vhost and database with the topology and schema applied (test and benchmark scaffolding, not
installed: bench imports it from here)."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import quote

import asyncpg

from common.postgres import create_database, drop_database
from common.urls import with_path
from consumers.broker_admin import ManagementApi, apply_topology, delete_users, delete_vhost
from consumers.persistence import migrate
from sntrack.settings import Settings

STAMP = "%Y%m%d%H%M%S"
SESSION_VARIABLE = "SNTRACK_TEST_SESSION"


def session_id() -> str:
    """Eight hex digits in the name of every sandbox this process and its children (pytest-xdist's workers) make,
    which tells this session's vhosts and users from a concurrent session's (tests.broker_audit)."""
    return os.environ.setdefault(SESSION_VARIABLE, uuid.uuid4().hex[:8])


@contextlib.asynccontextmanager
async def sandbox(base: Settings, prefix: str = "sntrack-sandbox", passwords: dict[str, str] | None = None,
                  **overrides) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh vhost `<prefix>-<UTC time>-<session>-<id>` and database named the same with _,
    and the role users `<vhost>-worker`, `<vhost>-consumer`, … (`passwords` maps a role to its user's password;
    without one a user cannot log in). All removed on exit. The time in the names tells `remove_stale` their age
    when an interrupted run left them."""
    suffix = f"{time.strftime(STAMP, time.gmtime())}-{session_id()}-{uuid.uuid4().hex[:8]}"
    vhost, database = f"{prefix}-{suffix}", f"{prefix.replace('-', '_')}_{suffix.replace('-', '_')}"
    api = ManagementApi(base.rabbitmq_admin_url)
    settings = base.replace(amqp_url=with_path(base.amqp_url, vhost),
                            database_url=with_path(base.database_url, database), **overrides)
    try:
        await asyncio.to_thread(apply_topology, api, vhost, passwords, user_prefix=vhost)
        await asyncio.to_thread(create_database, settings.database_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield settings
    finally:
        await asyncio.to_thread(delete_vhost, api, vhost)
        await asyncio.to_thread(delete_users, api, vhost)
        await asyncio.to_thread(drop_database, settings.database_url)


async def remove_stale(base: Settings, prefix: str, older_than_s: float = 86_400) -> list[str]:
    """Drop the databases, vhosts and users `sandbox(prefix=...)` named more than `older_than_s` ago, and the roles
    named after such a database (tests/test_db_roles.py): what interrupted runs left behind
    (tests/test_leftovers.py::test_stale_sandboxes_are_removed, ::test_stale_roles_are_removed). Names without a
    time are left alone: their age is unknown and another run may be using them."""
    api = ManagementApi(base.rabbitmq_admin_url)
    pattern = re.compile(rf"^{re.escape(prefix.replace('_', '-'))}-(\d{{14}})-")  # databases use _ for -
    cutoff = time.time() - older_than_s

    def stale(name: str) -> bool:
        found = pattern.match(name.replace("_", "-"))
        return bool(found) and _epoch(found.group(1)) < cutoff

    conn = await asyncpg.connect(with_path(base.database_url, "postgres"))
    try:
        databases = [r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")]
        vhosts = [v["name"] for v in await asyncio.to_thread(api.request, "GET", "vhosts") or []]
        removed = []
        for name in filter(stale, databases):
            await asyncio.to_thread(drop_database, with_path(base.database_url, name))
            removed.append(name)
        for name in filter(stale, [r["rolname"] for r in await conn.fetch("SELECT rolname FROM pg_roles")]):
            role = '"' + name.replace('"', '""') + '"'
            with contextlib.suppress(asyncpg.DependentObjectsStillExistError):  # still owns objects elsewhere
                await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
                removed.append(name)
    finally:
        await conn.close()
    users = [u["name"] for u in await asyncio.to_thread(api.request, "GET", "users") or []]
    for name in filter(stale, vhosts):
        await asyncio.to_thread(delete_vhost, api, name)  # one removed meanwhile by another session is skipped
        removed.append(name)
    for name in filter(stale, users):
        await asyncio.to_thread(api.request, "DELETE", f"users/{quote(name, safe='')}")
        removed.append(name)
    return removed


def _epoch(stamp: str) -> float:
    return calendar.timegm(time.strptime(stamp, STAMP))
