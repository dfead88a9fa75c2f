"""Which database login each command uses (issue 10, docs/design.md "Database roles"):

- `writer_pool`: SNTRACK_DATABASE_URL, the daemons' writer role (consume, subscribe, gateway, status,
  reconcile --repair);
- `read_pool`: SNTRACK_READ_DATABASE_URL, a SELECT-only role (report, export, trial, studies list/show, reconcile);
- `admin_pool`: SNTRACK_ADMIN_DATABASE_URL, the tables' owner (db migrate, replay, studies delete/restore,
  gateway token).

The last two default to SNTRACK_DATABASE_URL, so a single local superuser URL keeps working."""

from __future__ import annotations

import asyncpg

from consumers.persistence import create_pool
from sntrack.settings import Settings


async def writer_pool(settings: Settings, *, max_size: int = 1) -> asyncpg.Pool:
    return await create_pool(settings.database_url, max_size=max_size)


async def read_pool(settings: Settings, *, min_size: int = 1, max_size: int = 1) -> asyncpg.Pool:
    return await create_pool(settings.read_url, min_size=min_size, max_size=max_size,
                             variable=_named(settings.read_database_url, "SNTRACK_READ_DATABASE_URL"))


async def admin_pool(settings: Settings, *, min_size: int = 1, max_size: int = 1) -> asyncpg.Pool:
    return await create_pool(settings.admin_url, min_size=min_size, max_size=max_size,
                             variable=_named(settings.admin_database_url, "SNTRACK_ADMIN_DATABASE_URL"))


def _named(url: str | None, variable: str) -> str:
    """The variable an error should point at: the one that gave the URL, SNTRACK_DATABASE_URL when it is unset."""
    return variable if url else "SNTRACK_DATABASE_URL"
