"""sntrack db migrate — create the database if asked and apply the SQL migrations in order."""

from __future__ import annotations

import argparse
import asyncio

import asyncpg

from common.postgres import create_database
from consumers.persistence import create_pool, migrate
from sntrack.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("db", help="database schema", description="Manage the PostgreSQL schema.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    mig = actions.add_parser("migrate", help="apply pending migrations (safe to repeat)",
                             description="Apply consumers/sql/*.sql not yet recorded in schema_migrations.")
    mig.add_argument("--create", action="store_true", help="create the database first when it does not exist")
    mig.set_defaults(run=_migrate)


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    if args.create and await asyncio.to_thread(create_database, settings.database_url):
        print(f"created database {settings.database_name}")
    pool = await create_pool(settings.database_url, max_size=1)
    try:
        conn: asyncpg.Connection
        async with pool.acquire() as conn:
            applied = await migrate(conn)
    finally:
        await pool.close()
    print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
    return 0
