"""Library exceptions that are configuration mistakes, turned into the one line the command line prints."""

from __future__ import annotations


def configuration_message(exc: BaseException) -> str | None:
    """What to fix, when `exc` means the setup is wrong rather than the code; None otherwise.

    A database whose schema was never created fails its first query with `relation ... does not exist`, whichever
    command asks: one place here turns it into the hint (tests/test_config_errors.py)."""
    import asyncpg  # loaded only on this error path: most commands never touch PostgreSQL

    if isinstance(exc, asyncpg.UndefinedTableError):
        return f"the database has no sntrack schema ({exc}); run `sntrack db migrate`"
    if isinstance(exc, asyncpg.UndefinedColumnError):  # a schema from an older sntrack, not migrated since
        return f"a column sntrack needs is missing ({exc}): a schema older than this sntrack? run `sntrack db migrate`"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):  # a command run with another job's login
        return (f"PostgreSQL refused: {exc}; this command needs another login (README: Production set-up and "
                "security, which command uses which SNTRACK_*DATABASE_URL)")
    if isinstance(exc, asyncpg.TooManyConnectionsError):  # the login's CONNECTION LIMIT or the server's max_connections
        return f"PostgreSQL has no connection free: {exc}; try again when fewer are open, or raise the limit"
    return None
