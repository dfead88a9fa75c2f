"""The push side: one LISTEN connection, notifications coalesced into at most one read per window, and each
browser's pending changes merged per trial (drop-to-latest), so a flood cannot grow memory or fall behind.

Queue depths (consumer lag, dead letters) come from RabbitMQ's management API, whose own statistics are sampled
every 5 s: they are read every QUEUES_EVERY_S while a browser is connected, and pushed when they change.

A notification is sent by the projections' exactly-once apply (consumers.persistence.apply_events) from the
transaction that wrote the rows, and PostgreSQL delivers it only on commit: every read the hub makes after one sees
the committed rows. Nothing here runs on a timer; every read is caused by a notification or a connecting browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from datetime import datetime

import asyncpg
import structlog

from consumers.dashboard import queries
from consumers.persistence import READ_MODEL_CHANNEL

log = structlog.get_logger("sntrack.dashboard")

WINDOW_S = 0.05  # at most one read (and one push per browser) per window; the bench's lag p95 includes it
VERDICT_WINDOW_S = 1.0  # the verdict is rebuilt at most once a second (statistics over every trial)
SNAPSHOT_TRIALS = 500  # newest trials sent on connect; later changes to older ones arrive as pushes
MAX_PENDING = 2000  # trials pending for one browser beyond which it gets a fresh snapshot instead
QUEUES_EVERY_S = 5.0
READ_ONLY = {"default_transaction_read_only": "on", "application_name": "sntrack-dashboard"}
WATCHED = ("trials", "comparison")  # projections whose commits change what the page shows

Verdict = Callable[[asyncpg.Connection], Awaitable[dict]]
Queues = Callable[[], list[dict]]  # blocking: [{"name", "messages", "consumers"}]; run in a thread


def _jsonable(value):
    return value.isoformat() if isinstance(value, datetime) else value


def trial_row(record: asyncpg.Record) -> dict:
    row = {k: _jsonable(v) for k, v in record.items()}
    row["hyperparams"] = json.loads(row["hyperparams"])
    row["last_spectral_norms"] = json.loads(row["last_spectral_norms"]) if row["last_spectral_norms"] else None
    return row


class Client:
    """One browser's pending changes: the latest row of each changed trial and the latest verdict."""

    def __init__(self) -> None:
        self.trials: dict[str, dict] = {}
        self.verdict: dict | None = None
        self.queues: list[dict] | None = None
        self.reset = False  # too much pending: send a full snapshot instead
        self.wake = asyncio.Event()

    def offer_trials(self, rows: list[dict]) -> None:
        for row in rows:
            self.trials[row["id"]] = row
        if len(self.trials) > MAX_PENDING:
            self.trials.clear()
            self.reset = True
        self.wake.set()

    def offer_verdict(self, verdict: dict) -> None:
        self.verdict = verdict
        self.wake.set()

    def offer_queues(self, queues: list[dict]) -> None:
        self.queues = queues
        self.wake.set()

    def take(self) -> tuple[list[dict], dict | None, list[dict] | None, bool]:
        taken = list(self.trials.values()), self.verdict, self.queues, self.reset
        self.trials, self.verdict, self.queues, self.reset = {}, None, None, False
        self.wake.clear()
        return taken


class Hub:
    def __init__(self, pool: asyncpg.Pool, listen_url: str, verdict: Verdict, queues: Queues | None = None, *,
                 window_s: float = WINDOW_S):
        self.pool, self.listen_url, self.build_verdict, self.window_s = pool, listen_url, verdict, window_s
        self.read_queues = queues
        self.clients: set[Client] = set()
        self.verdict: dict | None = None
        self.queues: list[dict] | None = None
        self._watched = asyncio.Event()  # set while at least one browser is connected
        self.closing = False  # the server is shutting down: streams end
        self.lock = asyncio.Lock()  # reads and their distribution, in order: a snapshot never follows a newer push
        self._dirty: set[str] = set()
        self._everything = False
        self._changed = asyncio.Event()
        self._verdict_due = asyncio.Event()
        self._statuses: dict[str, str] = {}
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        await self._listen()
        self._verdict_due.set()
        self._tasks = [asyncio.create_task(self._push_trials()), asyncio.create_task(self._push_verdict())]
        if self.read_queues is not None:
            self._tasks.append(asyncio.create_task(self._push_queues()))

    async def _listen(self) -> None:
        self._listener = await asyncpg.connect(self.listen_url, server_settings=READ_ONLY)
        await self._listener.add_listener(READ_MODEL_CHANNEL, self._notified)
        self._listener.add_termination_listener(self._lost)

    def _lost(self, _conn) -> None:
        if not self.closing:
            self._tasks.append(asyncio.create_task(self._relisten()))

    async def _relisten(self) -> None:
        """The LISTEN connection dropped (PostgreSQL restarted): listen again, then reread everything, since
        notifications sent meanwhile are lost."""
        while not self.closing:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("dashboard cannot listen; retrying in 1 s", error=repr(exc))
                await asyncio.sleep(1)
                continue
            self._everything = True
            self._changed.set()
            self._verdict_due.set()
            return

    def end_streams(self) -> None:
        self.closing = True
        for client in self.clients:
            client.wake.set()

    async def close(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        change = json.loads(payload)
        if change["projection"] == "comparison":
            self._verdict_due.set()
        if change["projection"] not in WATCHED:
            return
        if change["trials"] is None:
            self._everything = True
        else:
            self._dirty.update(change["trials"])
        self._changed.set()

    async def read_trials(self, ids: list[str] | None, limit: int = SNAPSHOT_TRIALS) -> list[dict]:
        async with self.pool.acquire() as conn:
            return [trial_row(r) for r in await conn.fetch(queries.TRIALS, ids, limit)]

    async def _push_trials(self) -> None:
        last = 0.0
        while True:
            await self._changed.wait()
            if (wait := last + self.window_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)  # coalesce: what arrives meanwhile joins this read
            self._changed.clear()
            ids, everything = self._dirty, self._everything
            self._dirty, self._everything = set(), False
            last = time.monotonic()
            try:
                async with self.lock:
                    rows = await self.read_trials(None if everything else sorted(ids),
                                                  SNAPSHOT_TRIALS if everything else len(ids))
                    for client in self.clients:
                        client.offer_trials(rows)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("dashboard read failed; retrying on the next change", error=repr(exc))
                self._dirty |= ids
                self._everything |= everything
                continue
            finished = [r for r in rows if r["status"] != "running" and self._statuses.get(r["id"]) != r["status"]]
            self._statuses.update((r["id"], r["status"]) for r in rows)
            if finished:
                self._verdict_due.set()

    async def _push_verdict(self) -> None:
        while True:
            await self._verdict_due.wait()
            self._verdict_due.clear()
            started = time.monotonic()
            try:
                async with self.pool.acquire() as conn:
                    verdict = await self.build_verdict(conn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("dashboard verdict failed; retrying on the next change", error=repr(exc))
                continue
            self.verdict = verdict
            for client in self.clients:
                client.offer_verdict(verdict)
            await asyncio.sleep(max(0.0, started + VERDICT_WINDOW_S - time.monotonic()))

    async def _push_queues(self) -> None:
        while True:
            await self._watched.wait()
            try:
                queues = await asyncio.to_thread(self.read_queues)
            except Exception as exc:  # noqa: BLE001 - the broker's API being away must not stop the page
                log.warning("dashboard cannot read queue depths", error=repr(exc))
                queues = None
            if queues is not None and queues != self.queues:
                self.queues = queues
                for client in self.clients:
                    client.offer_queues(queues)
            await asyncio.sleep(QUEUES_EVERY_S)

    @contextlib.asynccontextmanager
    async def subscribe(self):
        """A new browser: (its Client, a consistent snapshot of the newest trials). Pushes that follow are newer."""
        client = Client()
        async with self.lock:
            snapshot = await self.read_trials(None)
            self.clients.add(client)
            self._watched.set()
        try:
            yield client, snapshot
        finally:
            self.clients.discard(client)
            if not self.clients:
                self._watched.clear()

    async def snapshot(self, client: Client) -> list[dict]:
        """A full snapshot for a browser that fell too far behind; its pending changes are superseded."""
        async with self.lock:
            rows = await self.read_trials(None)
            client.trials.clear()
            return rows
