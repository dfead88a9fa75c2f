"""Creating and dropping a PostgreSQL database by URL: the one place that knows how (sntrack's own database, the
Optuna storage, MLflow's backend, scratch databases of tests and benchmarks).

Synchronous (psycopg2) so the training worker's synchronous code can use it; async callers wrap it in
`asyncio.to_thread`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg2
from psycopg2 import errors, sql

from common.errors import ConfigurationError
from common.urls import path_name, redact, with_path


@contextlib.contextmanager
def admin_cursor(database_url: str) -> Iterator[psycopg2.extensions.cursor]:
    """An autocommit cursor on `postgres`, the maintenance database of the server `database_url` names."""
    admin_url = with_path(database_url, "postgres", scheme="postgresql")
    try:
        conn = psycopg2.connect(admin_url, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        reason = " ".join(str(exc).split())  # libpq's text spans lines; an error here is one
        raise ConfigurationError(f"cannot reach PostgreSQL at {redact(admin_url)} ({reason})") from None
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            yield cur
    finally:
        conn.close()


def create_database(database_url: str) -> bool:
    """Create the database named in the URL if missing; False when it existed (or another process created it)."""
    name = path_name(database_url)
    with admin_cursor(database_url) as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is not None:
            return False
        try:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except errors.DuplicateDatabase:
            return False
        return True


def drop_database(database_url: str) -> None:
    """Drop the database named in the URL, if any, closing its sessions (scratch databases of tests and benches)."""
    with admin_cursor(database_url) as cur:
        name = sql.Identifier(path_name(database_url))
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
