"""sntrack db migrate [--create] [--roles] — create the database if asked, apply the SQL migrations in order, and
set up the writer and reader roles (consumers/roles.py). Runs as the tables' owner: SNTRACK_ADMIN_DATABASE_URL."""

from __future__ import annotations

import argparse
import asyncio
import sys
from urllib.parse import urlsplit

import asyncpg

from common.errors import ConfigurationError
from common.postgres import create_database
from common.urls import path_name
from consumers.persistence import migrate
from consumers.registry import PLUGINS, plugin_migrations, plugin_tables
from consumers.roles import RoleSpec, ensure_roles
from sntrack.pools import admin_pool
from sntrack.settings import Settings

EXAMPLES = """examples:
  sntrack db migrate --create
  SNTRACK_DB_WRITER_PASSWORD=... SNTRACK_DB_READER_PASSWORD=... sntrack db migrate --roles"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("db", help="database schema and roles", description="Manage the PostgreSQL schema.",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    mig = actions.add_parser(
        "migrate", help="apply pending migrations (safe to repeat); --roles: set up the writer and reader roles",
        description="Apply consumers/sql/*.sql not yet recorded in schema_migrations, then the migrations of the "
        "installed projection plugins (recorded as plugin:NAME/FILE), connected as "
        "SNTRACK_ADMIN_DATABASE_URL (default SNTRACK_DATABASE_URL): the tables' owner. With --roles, then create "
        "or update the login roles SNTRACK_DB_WRITER_ROLE (default sntrack_writer: the daemons) and "
        "SNTRACK_DB_READER_ROLE (default sntrack_reader: SELECT only) with the passwords in "
        "SNTRACK_DB_WRITER_PASSWORD / SNTRACK_DB_READER_PASSWORD (needed to create a role; unset: an existing "
        "role keeps its password), and set their grants afresh. Repeat it after every upgrade.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    mig.add_argument("--create", action="store_true", help="create the database first when it does not exist")
    mig.add_argument("--roles", action="store_true",
                     help="also create/update the writer and reader roles and their grants (needs CREATEROLE)")
    mig.set_defaults(run=_migrate)


def _roles(settings: Settings) -> tuple[RoleSpec, RoleSpec]:
    def secret(value) -> str | None:
        return None if value is None else value.get_secret_value()
    return (RoleSpec(settings.db_writer_role, secret(settings.db_writer_password), "SNTRACK_DB_WRITER_PASSWORD"),
            RoleSpec(settings.db_reader_role, secret(settings.db_reader_password), "SNTRACK_DB_READER_PASSWORD"))


async def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    url = settings.admin_url
    if args.create and await asyncio.to_thread(create_database, url):
        print(f"created database {path_name(url)}")
    pool = await admin_pool(settings)
    try:
        conn: asyncpg.Connection
        async with pool.acquire() as conn:
            applied = await migrate(conn, plugin_migrations())
            roles = await ensure_roles(conn, *_roles(settings), plugin_tables()) if args.roles else []
    except asyncpg.InsufficientPrivilegeError as exc:
        raise ConfigurationError(
            f"`sntrack db migrate` as {urlsplit(url).username} was refused: {exc}; run it as the owner of the database "
            f"and its tables{', with CREATEROLE' if args.roles else ''} (SNTRACK_ADMIN_DATABASE_URL)") from None
    finally:
        await pool.close()
    for plugin in PLUGINS:
        if plugin.problem:
            print(f"skipped projection plugin {plugin.name} ({plugin.distribution}): {plugin.problem}", file=sys.stderr)
    print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
    if roles:
        print(f"roles: {'; '.join(roles)}; grants set")
    return 0
