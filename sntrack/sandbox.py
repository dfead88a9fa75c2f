"""A throw-away vhost and database with the topology and schema applied (tests and benchmarks)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from consumers.persistence import create_database, drop_database, migrate
from sntrack.broker import ManagementApi, apply_topology, delete_vhost
from sntrack.settings import Settings


def with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{path}"))


@contextlib.asynccontextmanager
async def sandbox(base: Settings, prefix: str = "sntrack-sandbox", **overrides) -> AsyncIterator[Settings]:
    """Settings pointing at a fresh vhost `<prefix>-<id>` and database `<prefix>_<id>`; both removed on exit."""
    suffix = uuid.uuid4().hex[:12]
    vhost, database = f"{prefix}-{suffix}", f"{prefix.replace('-', '_')}_{suffix}"
    api = ManagementApi(base.rabbitmq_admin_url)
    settings = base.model_copy(update={
        "amqp_url": with_path(base.amqp_url, vhost),
        "database_url": with_path(base.database_url, database),
        **overrides,
    })
    await asyncio.to_thread(apply_topology, api, vhost)
    try:
        await create_database(settings.database_url)
        conn = await asyncpg.connect(settings.database_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield settings
    finally:
        await asyncio.to_thread(delete_vhost, api, vhost)
        await drop_database(settings.database_url)
