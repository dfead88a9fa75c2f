"""Shared fixtures: every test gets its own RabbitMQ vhost and PostgreSQL database, removed afterwards.

Services are the real local ones (start them with `make services`); URLs come from the same SNTRACK_*
variables the tool reads, so the suite can be pointed at other servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import asyncpg
import pytest

from common.errors import ConfigurationError
from common.urls import with_login
from consumers.broker_admin import ROLES, ManagementApi, user_name
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from schemas import EXCHANGE
from sntrack.settings import Settings
from tests.broker_audit import differences, export_access
from tests.sandbox import remove_stale, sandbox, session_id

TEST_PREFIX = "sntrack-test"
BROKER_ACCESS = pytest.StashKey[dict]()


def applied_sql(projection: str) -> str:
    """SQL counting the events (of $2, a uuid[]; NULL: all) that projection $1 applied: its applied_events rows, or the
    rows of a projection that dedupes itself and keeps none (the journal: its events)."""
    if PROJECTIONS[projection].dedupes_itself:
        return "SELECT count(*) FROM events WHERE $1::text IS NOT NULL AND ($2::uuid[] IS NULL OR event_id = ANY($2))"
    return "SELECT count(*) FROM applied_events WHERE projection = $1 AND ($2::uuid[] IS NULL OR event_id = ANY($2))"


@dataclass
class TestEnv:
    settings: Settings
    vhost: str
    database: str
    api: ManagementApi
    roles: dict[str, str]  # role (worker, gateway, consumer, subscriber) → SNTRACK_AMQP_URL of the sandbox's user

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.settings.database_url)

    async def fetch(self, sql: str, *args):
        conn = await self.db()
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args):
        conn = await self.db()
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    async def applied(self, projection: str, ids: list | None = None) -> int:
        """How many events (of `ids`, when given) `projection` applied (applied_sql)."""
        return await self.fetchval(applied_sql(projection), projection, ids)

    async def has_applied(self, projection: str, expected: int, ids: list | None = None) -> bool:
        return await self.applied(projection, ids) == expected

    async def all_applied(self, projections: tuple[str, ...], expected: int) -> bool:
        """Each of `projections` applied `expected` events."""
        return all([await self.has_applied(name, expected) for name in projections])

    async def replay(self, name: str):
        """Rebuild projection `name` from the journal, as `sntrack replay` does."""
        pool = await asyncpg.create_pool(self.settings.database_url, min_size=2, max_size=2)
        try:
            return await replay(pool, PROJECTIONS[name])
        finally:
            await pool.close()

    async def snapshot(self, *tables: str) -> dict[str, list[dict]]:
        """Every row of each table, in primary-key order, for row-by-row comparisons."""
        conn = await self.db()
        try:
            out = {}
            for table in tables:
                key = await conn.fetchval(
                    "SELECT string_agg(a.attname, ', ' ORDER BY array_position(i.indkey, a.attnum)) "
                    "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                    "WHERE i.indrelid = $1::regclass AND i.indisprimary", table)
                out[table] = [dict(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY {key}")]
            return out
        finally:
            await conn.close()

    async def publish_events(self, events, duplicates: int = 0) -> None:
        """Publish validated events (confirmed), plus `duplicates` re-sends of random ones."""
        messages = [(e.to_json(), e.event_type) for e in events]
        await self._publish(messages + random.sample(messages, min(duplicates, len(messages))))

    async def publish_raw(self, bodies: list[bytes], routing_key: str = "ml.run.metric") -> None:
        """Publish bytes as-is (confirmed), bypassing the producer: for poison messages and baselines."""
        await self._publish([(body, routing_key) for body in bodies])

    async def _publish(self, messages: list[tuple[bytes, str]]) -> None:
        """(body, routing key) pairs to ml.events, persistent, confirmed, 500 in flight at a time."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            for start in range(0, len(messages), 500):
                await asyncio.gather(*(
                    exchange.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                      content_type="application/json"), routing_key=key)
                    for body, key in messages[start:start + 500]
                ))
        finally:
            await connection.close()

    def queue_depth(self, queue: str) -> int:
        info = self.api.request("GET", f"queues/{self.vhost}/{queue}") or {}
        return int(info.get("messages", 0))

    def consumers(self, queue: str) -> int:
        """Consumers the broker lists on `queue`; its statistics lag by up to one sampling interval (5 s)."""
        listed = self.api.request("GET", f"consumers/{self.vhost}") or []
        return sum(c["queue"]["name"] == queue for c in listed)

    async def dead_letters(self, queue: str, limit: int = 1000) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Drain up to `limit` messages from `<queue>.dlq` (acking them)."""
        connection = await aio_pika.connect(self.settings.amqp_url)
        out = []
        try:
            channel = await connection.channel()
            dlq = await channel.get_queue(f"{queue}.dlq", ensure=False)
            while len(out) < limit:
                message = await dlq.get(fail=False, timeout=5)
                if message is None:
                    break
                await message.ack()
                out.append(message)
        finally:
            await connection.close()
        return out


def pytest_configure(config: pytest.Config) -> None:
    session_id()  # set before pytest-xdist starts its workers, which inherit it and name their sandboxes with it


def pytest_sessionstart(session: pytest.Session) -> None:
    """In the controller (pytest-xdist's, or the only process): remove what interrupted sessions left more than a day
    ago (tests.sandbox.remove_stale), then export the broker's users and permissions for pytest_sessionfinish."""
    if hasattr(session.config, "workerinput"):
        return
    settings = Settings.from_env()
    with contextlib.suppress(ConfigurationError, OSError):  # services down: the tests will say so themselves
        asyncio.run(remove_stale(settings, TEST_PREFIX))
        session.config.stash[BROKER_ACCESS] = export_access(ManagementApi(settings.rabbitmq_admin_url))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the session when the broker's users and permissions differ from what it found (tests.broker_audit)."""
    before = session.config.stash.get(BROKER_ACCESS, None)
    if before is None or hasattr(session.config, "workerinput"):
        return
    try:
        after = export_access(ManagementApi(Settings.from_env().rabbitmq_admin_url))
    except ConfigurationError as exc:
        lines = [f"could not export them again: {exc}"]
    else:
        lines = differences(before, after, session_id())
    if lines:
        report = session.config.pluginmanager.get_plugin("terminalreporter")
        say = report.write_line if report else print
        say("")
        say("FAILED: this session did not leave the broker's users and permissions as it found them:")
        for line in lines:
            say(f"  {line}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
async def env(tmp_path) -> TestEnv:
    base = Settings.from_env()
    # Tests count bookkeeping rows to know a consumer applied everything; a daemon older than prune_every_s would
    # delete the metric rows of a journal over consumers.pruning.KEEP positions. tests/test_pruning.py prunes itself.
    overrides = {"spool_dir": tmp_path / "spool", "mlflow_enabled": False, "prune_every_s": 24 * 3600.0}
    passwords = {role: secrets.token_urlsafe(12) for role in ROLES}
    async with sandbox(base, prefix=TEST_PREFIX, passwords=passwords, **overrides) as settings:
        vhost = settings.amqp_vhost
        roles = {role: with_login(settings.amqp_url, user_name(role, vhost), passwords[role]) for role in ROLES}
        yield TestEnv(settings, vhost, settings.database_name, ManagementApi(base.rabbitmq_admin_url), roles)


async def wait_until(predicate: Callable, timeout: float = 30.0, interval: float = 0.1, what: str = "condition"):
    """Poll `predicate` (sync or async) until truthy; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
