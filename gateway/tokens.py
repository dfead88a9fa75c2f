"""Bearer tokens: `sntk_<id>_<secret>`, stored as the SHA-256 of the secret and bound to a producer id.

The id is public (it names the token in `token list` and `token revoke`); the secret is shown once, at creation.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

import asyncpg
from pydantic import TypeAdapter, ValidationError

from schemas.events import Identifier

PREFIX = "sntk"
_PRODUCER_ID = TypeAdapter(Identifier)
LOOKUP_TIMEOUT_S = 5.0


class Verdict(StrEnum):
    MALFORMED = "malformed"  # 401: not a bearer token of ours
    UNKNOWN = "unknown"  # 403: well formed, but no such token or the wrong secret
    REVOKED = "revoked"  # 403


@dataclass(frozen=True)
class TokenInfo:
    id: str
    producer_id: str
    created_at: datetime
    revoked_at: datetime | None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    prefix, _, rest = token.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != PREFIX or len(token_id) != 12 or len(secret) < 32 or not token_id.isalnum():
        return None
    return token_id, secret


def check_producer_id(producer_id: str) -> str:
    """The producer id if the contract accepts it as producer.worker_id; ValueError saying why otherwise."""
    try:
        return _PRODUCER_ID.validate_python(producer_id)
    except ValidationError as exc:
        raise ValueError(f"invalid producer id {producer_id!r}: {exc.errors()[0]['msg']}") from None


async def add_token(conn: asyncpg.Connection, producer_id: str) -> tuple[str, str]:
    """Create a token for `producer_id`: (its id, the token to hand to the producer, shown only now)."""
    check_producer_id(producer_id)
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    await conn.execute("INSERT INTO gateway_tokens (id, producer_id, secret_sha256) VALUES ($1, $2, $3)",
                       token_id, producer_id, _digest(secret))
    return token_id, f"{PREFIX}_{token_id}_{secret}"


async def list_tokens(conn: asyncpg.Connection) -> list[TokenInfo]:
    rows = await conn.fetch("SELECT id, producer_id, created_at, revoked_at FROM gateway_tokens ORDER BY created_at")
    return [TokenInfo(**dict(r)) for r in rows]


async def revoke_token(conn: asyncpg.Connection, token_id: str) -> bool:
    """Revoke; False when there is no such token (revoking twice is harmless and True)."""
    status = await conn.execute(
        "UPDATE gateway_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1", token_id)
    return status != "UPDATE 0"


class TokenStoreUnavailable(Exception):
    """PostgreSQL did not answer a token lookup: the request can be retried (503), it was not refused."""


class TokenVerifier:
    """Answers whether a bearer token may post, and as which producer. Lookups are cached for `cache_s` seconds,
    so a revocation takes effect within that time
    (tests/test_gateway.py::test_wrong_revoked_and_missing_tokens_get_401_or_403). A token in use is looked up
    again in the background once its entry is half that old, so its requests do not wait for PostgreSQL
    (tests/test_gateway.py::test_a_token_in_use_is_refreshed_without_holding_requests); one lookup per token is in
    flight at a time, however many requests need it."""

    def __init__(self, pool: asyncpg.Pool, cache_s: float):
        self._pool = pool
        self._cache_s = cache_s
        self._cache: dict[str, tuple[float, str | None, bytes | None, bool]] = {}
        self._lookups: dict[str, asyncio.Task] = {}

    async def verify(self, token: str) -> tuple[str, str] | Verdict:
        """(token id, producer id) when the token is valid, else why not."""
        parts = split_token(token)
        if parts is None:
            return Verdict.MALFORMED
        token_id, secret = parts
        cached = self._cache.get(token_id)
        age = time.monotonic() - cached[0] if cached is not None else math.inf
        if age > self._cache_s:
            cached = await asyncio.shield(self._lookup(token_id))  # a cancelled request leaves it to the others
        elif age > self._cache_s / 2:
            self._lookup(token_id)  # ahead of time: this request goes on with the entry, still young enough
        _, producer_id, digest, revoked = cached
        if producer_id is None or not hmac.compare_digest(digest, _digest(secret)):
            return Verdict.UNKNOWN
        if revoked:
            return Verdict.REVOKED
        return token_id, producer_id

    def _lookup(self, token_id: str) -> asyncio.Task:
        """The lookup of `token_id` in flight, started when there is none."""
        if (task := self._lookups.get(token_id)) is None:
            task = self._lookups[token_id] = asyncio.create_task(self._fetch(token_id))
            task.add_done_callback(lambda done: (self._lookups.pop(token_id, None),  # and a failure of a refresh
                                                 done.cancelled() or done.exception()))  # nobody awaited is dropped
        return task

    async def _fetch(self, token_id: str) -> tuple[float, str | None, bytes | None, bool]:
        started = time.monotonic()  # the entry's age counts from before the query: a revocation it missed is newer
        try:
            row = await self._pool.fetchrow(
                "SELECT producer_id, secret_sha256, revoked_at IS NOT NULL AS revoked FROM gateway_tokens "
                "WHERE id = $1", token_id, timeout=LOOKUP_TIMEOUT_S)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise TokenStoreUnavailable(f"{type(exc).__name__}: {exc}"[:300]) from None
        entry = (started, *(row.values() if row else (None, None, False)))
        if row is not None:  # unknown ids are not kept: random ones must not grow the cache
            self._cache[token_id] = entry
        return entry
