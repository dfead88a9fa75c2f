"""A catch-up subscriber: the matching history from the journal, then its live queue, with no gap and no duplicate
at the switch, resuming where it stopped. The argument is in docs/design.md ("Catch-up subscribers"); in short:

- W, the subscriber's position (table subscriber_positions, written before anything is acked): every journal event
  at or below position W that matches the bindings has been delivered.
- The queue is bound first (the runtime declares it; `run_subscriber` waits for that), so every event published
  from then on is in the queue, and every one published before is, or will be, in the journal.
- Catch-up: deliver the matching journal events above W up to a fenced head (every position at or below it is
  committed or never will be), advance W, repeat until a round finds little.
- Live: a queued event whose journal position is at or below W was delivered from the journal and is skipped. The
  first live batch after a catch-up waits (bounded by journal_wait_s) until the journal holds one of its events;
  the journal consumer writes in queue order, so every event published before the bind is then at or below that
  event's position. For each batch, the matching journal events between W and the batch's highest position that
  the subscriber has not delivered are delivered from the journal, in its order (what was published before the
  bind and journaled late, what the queue dropped when it overflowed (x-max-length), and the batch's own journaled
  events); W moves up to that position; the rest of the batch, not journaled yet, is delivered from the queue.
- Events delivered from the queue before the journal held them are remembered (the last RECENT ids), so neither
  path delivers them twice. At least once overall: after a crash the batch in hand comes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import aio_pika
import asyncpg
import structlog
from aio_pika.abc import AbstractIncomingMessage

from common.errors import ConfigurationError
from consumers.dead_letters import REQUEUED_HEADER
from consumers.handler import DeadLetter, RetryLater
from consumers.persistence import TRANSIENT_ERRORS
from consumers.runtime import HANDLER_ATTEMPTS, MAX_BACKOFF_S, ConsumerRuntime
from consumers.subscriber import Sink, matching_types
from consumers.topology import subscriber_queue
from schemas import DEAD_LETTER_EXCHANGE, Event
from schemas.topology import DETAIL_HEADER, REASON_HEADER
from schemas.upcasting import read_stored

log = structlog.get_logger("sntrack.subscriber")

PAGE = 2000
RECENT = 100_000  # ids delivered from the queue that the journal may not hold yet, remembered for dedupe
POLL_S = 0.1
SAVE_EVERY_S = 0.5
DEAD_LETTER_BACKOFF_S = 10.0

# The fence. Positions are taken in insert order, not commit order, so "the highest position visible" does not yet
# mean "every lower one is visible". Every transaction that took a position holds a RowExclusiveLock on events until
# it ends: once the transactions holding one when the head was read have ended, every position at or below that head
# is committed or never will be. Only the writers of this database's journal are waited for (a snapshot's xip
# would also wait for every other database's long transactions). Needs no privilege: pg_locks is public.
HEAD = "SELECT coalesce(max(position), 0) FROM events"
JOURNAL_WRITERS = """
SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks
WHERE locktype = 'relation' AND relation = 'events'::regclass AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
STILL_RUNNING = "SELECT count(*) FROM pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY($1::text[])"
LOAD = "SELECT bindings, position, floor FROM subscriber_positions WHERE name = $1"
SAVE = """
INSERT INTO subscriber_positions (name, bindings, position, last_event_id, floor) VALUES ($1, $2, $3, $4, $3)
ON CONFLICT (name) DO UPDATE SET position = excluded.position,
    last_event_id = coalesce(excluded.last_event_id, subscriber_positions.last_event_id), updated_at = now()
"""
JOURNAL_PAGE = """
SELECT position, envelope::text AS envelope FROM events
WHERE position > $1 AND position <= $2 AND event_type = ANY($3::text[])
ORDER BY position LIMIT $4
"""
SINCE = """
SELECT position, event_id FROM events WHERE position > $1 AND position <= $2 AND event_type = ANY($3::text[])
ORDER BY position
"""
POSITIONS = "SELECT event_id, position FROM events WHERE event_id = ANY($1::uuid[])"
FROM_TIME = "SELECT min(position) - 1 FROM events WHERE occurred_at >= $1"
# One copy per name: two would share the queue (each delivering part of the live events) and the position row (last
# writer wins, so it could move back). A session lock, held on a connection of its own, dies with the process.
SOLE_COPY = "SELECT pg_try_advisory_lock(hashtext('sntrack.subscriber'), hashtext($1))"


@contextlib.asynccontextmanager
async def sole_copy(pool: asyncpg.Pool, name: str):
    """Hold subscriber `name` for this process; ConfigurationError when another copy holds it."""
    async with pool.acquire() as conn:  # released: the pool's reset unlocks it
        if not await conn.fetchval(SOLE_COPY, name):
            raise ConfigurationError(f"subscriber {name} is already running (another `sntrack subscribe {name}`); "
                                     "stop it first, or choose another name")
        yield


@dataclass(frozen=True)
class Start:
    """Where a subscriber without a stored position begins: the whole journal, a time, or now (the head)."""
    from_start: bool = False
    since: datetime | None = None

    @property
    def catches_up(self) -> bool:
        return self.from_start or self.since is not None


class Recent:
    """A bounded set: the last `size` ids added."""

    def __init__(self, size: int = RECENT):
        self.order: deque[UUID] = deque()
        self.ids: set[UUID] = set()
        self.size = size

    def add(self, event_id: UUID) -> None:
        if event_id in self.ids:
            return
        self.order.append(event_id)
        self.ids.add(event_id)
        if len(self.order) > self.size:
            self.ids.discard(self.order.popleft())

    def __contains__(self, event_id: UUID) -> bool:
        return event_id in self.ids


class CatchUpSubscriber:
    """The Handler the consumer runtime feeds with live batches, and the catch-up that comes before them."""

    def __init__(self, name: str, bindings: Sequence[str], sink: Sink, pool: asyncpg.Pool, *,
                 journal_wait_s: float = 30.0):
        self.name = f"sub.{name}"
        self.subscriber = name
        self.bindings = list(bindings)
        self.types = matching_types(bindings)
        self.queue = subscriber_queue(name, tuple(bindings))
        self.sink = sink
        self.pool = pool
        self.journal_wait_s = journal_wait_s
        self.position = 0
        self.floor = 0  # where it began: queued events at or below it were never delivered from the journal
        self.recent = Recent()
        self.unjournaled = Recent()  # delivered from the queue before the journal held them: W has not passed them
        self.awaiting_marker = False  # the first live batch must find itself in the journal first
        self.caught_up = asyncio.Event()
        self.stopping = asyncio.Event()
        self._stop_runtime = lambda: None
        self.failure: str | None = None
        self.delivered = {"journal": 0, "queue": 0, "skipped": 0}
        self.dead_letters: aio_pika.abc.AbstractExchange | None = None
        self.requeued: set[UUID] = set()  # ids of the batch in hand that `sntrack dlq requeue` sent back

    def stop(self) -> None:
        """Stop the catch-up and the runtime feeding live batches (a signal, or a failure of the subscriber). The
        runtime's own stop() calls this one back: the second call returns at once."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        self._stop_runtime()

    # -- position --------------------------------------------------------------------------------------------

    async def load(self, start: Start) -> None:
        """The stored position, or the start's for a new subscriber (stored at once)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(LOAD, self.subscriber)
            if row is not None:
                if sorted(row["bindings"]) != sorted(self.bindings):
                    raise ConfigurationError(
                        f"subscriber {self.subscriber} is bound to {' '.join(row['bindings'])}; run it with the same "
                        "--bind, or choose another name")
                self.position, self.floor, self.awaiting_marker = row["position"], row["floor"], True
                return
            if start.from_start:
                self.position = 0
            elif start.since is not None:
                first = await conn.fetchval(FROM_TIME, start.since)
                self.position = await self._head(conn) if first is None else first
            else:
                self.position = await self._head(conn)
            self.awaiting_marker, self.floor = start.catches_up, self.position
            await conn.execute(SAVE, self.subscriber, self.bindings, self.position, None)

    async def _save(self, conn: asyncpg.Connection, last: UUID | None) -> None:
        await conn.execute(SAVE, self.subscriber, self.bindings, self.position, last)

    async def _head(self, conn: asyncpg.Connection) -> int:
        """The fenced journal head: every position at or below it is committed or never will be."""
        head = await conn.fetchval(HEAD)
        await self._fence(conn)
        return head

    async def _fence(self, conn: asyncpg.Connection, *, patience_s: float | None = None) -> bool:
        """Wait until the transactions writing the journal now have ended (see HEAD): until told to stop (then
        RetryLater), or at most `patience_s` (then False)."""
        writers = await conn.fetchval(JOURNAL_WRITERS)
        deadline = None if patience_s is None else time.monotonic() + patience_s
        while writers and await conn.fetchval(STILL_RUNNING, writers):
            if deadline is None and self.stopping.is_set():
                raise RetryLater("stopping")
            if deadline is not None and time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # -- catch-up --------------------------------------------------------------------------------------------

    async def catch_up(self) -> None:
        """Deliver the journal above the position up to the head, until a round finds less than a page."""
        try:
            async with self.pool.acquire() as conn:
                while not self.stopping.is_set():
                    if await self._journal_until(conn, await self._head(conn)) < PAGE:
                        break
        finally:
            self.caught_up.set()

    async def _journal_until(self, conn: asyncpg.Connection, top: int) -> int:
        """Deliver the matching journal events in (position, top] not delivered from the queue already, in journal
        order, saving the position after each page and every SAVE_EVERY_S; how many were read."""
        read = 0
        while self.position < top and not self.stopping.is_set():
            rows = await conn.fetch(JOURNAL_PAGE, self.position, top, self.types, PAGE)
            saved = time.monotonic()
            for row in rows:
                if self.stopping.is_set():  # what was delivered so far counts
                    await self._save(conn, None)
                    return read
                event = read_stored(row["envelope"])  # old journals hold superseded versions: upcast
                if event.event_id not in self.recent:
                    await self._deliver_from_journal(event)
                self.position, read = row["position"], read + 1
                if time.monotonic() - saved > SAVE_EVERY_S:  # a crash repeats at most this much work
                    await self._save(conn, event.event_id)
                    saved = time.monotonic()
            if len(rows) < PAGE:
                self.position = top  # no other matching event up to top
            await self._save(conn, None)
        return read

    async def _deliver_from_journal(self, event: Event) -> None:
        """Deliver one journal event: transient failures retried until they pass; others HANDLER_ATTEMPTS times,
        then dead-lettered like a live event (there is no queued message to keep)."""
        backoff, failures = 0.1, 0
        while True:
            try:
                await self.sink(event)
                self.delivered["journal"] += 1
                return
            except (RetryLater, *TRANSIENT_ERRORS) as exc:
                if self.stopping.is_set():
                    raise RetryLater("stopping") from exc
                log.warning("handler asks to retry later", error=str(exc) or type(exc).__name__, backoff_s=backoff)
            except DeadLetter as exc:
                await self._dead_letter(event, exc.reason, exc.detail)
                return
            except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the subscriber
                failures += 1
                log.error("handler failed", error=repr(exc), attempt=failures, event_id=str(event.event_id))
                if failures >= HANDLER_ATTEMPTS:
                    await self._dead_letter(event, "handler_error", repr(exc))
                    return
            await self._pause(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _dead_letter(self, event: Event, reason: str, detail: str) -> None:
        """A copy to sntrack.sub.NAME.dlq through the dead-letter exchange, confirmed and routed."""
        message = aio_pika.Message(
            event.to_json(), message_id=str(event.event_id), content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={REASON_HEADER: reason, DETAIL_HEADER: detail[:1000], "x-sntrack-consumer": self.name,
                     "x-sntrack-routing-key": event.event_type, "x-sntrack-source": "journal"})
        backoff = 0.5
        while True:
            try:
                await self.dead_letters.publish(message, routing_key=self.queue.name, mandatory=True, timeout=30)
                log.warning("event dead-lettered", reason=reason, detail=detail[:300], event_id=str(event.event_id))
                return
            except Exception as exc:  # noqa: BLE001 - returned, nacked or channel error: try again
                log.error("dead-letter queue refused the event; retrying", error=repr(exc), retry_in_s=backoff)
                if self.stopping.is_set():
                    raise RetryLater("stopping") from exc
                await self._pause(backoff)
                backoff = min(backoff * 2, DEAD_LETTER_BACKOFF_S)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    # -- live ------------------------------------------------------------------------------------------------

    async def handle(self, events: Sequence[Event]) -> None:
        """A live batch, called by the runtime, which acks it once this returns."""
        await self._wait_caught_up()
        requeued = [e for e in events if e.event_id in self.requeued]
        for event in requeued:  # sent back by `sntrack dlq requeue`: delivered again, whatever the position says
            await self.sink(event)
            self.requeued.discard(event.event_id)
            self.delivered["queue"] += 1
        fresh = [e for e in events if e.event_id not in self.recent and e not in requeued]
        if not fresh:
            return
        async with self.pool.acquire() as conn:
            journaled = await self._positions(conn, fresh)
            if journaled and (top := max(journaled.values())) > self.position:
                # Up to the batch's highest position, everything comes from the journal, in its order: what the
                # queue lacks below the batch (published before the bind, or dropped on overflow), and the batch's
                # own journaled events.
                await self._fence(conn)
                await self._journal_until(conn, top)
                if self.position < top:
                    raise RetryLater("stopping before the gap below this batch was filled")
            done = {i for i, p in journaled.items() if self.floor < p <= self.position}  # from the journal
            for event in fresh:
                if event.event_id in done:
                    self.delivered["skipped"] += 1
                    continue
                await self.sink(event)
                self.recent.add(event.event_id)
                if event.event_id not in journaled:
                    self.unjournaled.add(event.event_id)
                self.delivered["queue"] += 1
            await self._save(conn, fresh[-1].event_id)

    async def settle(self, wait_s: float = 5.0) -> None:
        """On a graceful stop: move the position past the events delivered from the queue before the journal held
        them (waiting up to `wait_s` for it), as far as every matching journal event up to there was delivered,
        so that a restart does not deliver them again."""
        pending = list(self.unjournaled.order)
        deadline = time.monotonic() + wait_s
        async with self.pool.acquire() as conn:
            while pending:
                found = await conn.fetch(POSITIONS, pending)
                if len(found) == len(pending) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL_S)
            if not pending or not found or (top := max(r["position"] for r in found)) <= self.position:
                return
            if not await self._fence(conn, patience_s=wait_s):
                return
            position = top
            for row in await conn.fetch(SINCE, self.position, top, self.types):
                if row["event_id"] not in self.recent:
                    position = row["position"] - 1  # the first one not delivered: stop before it
                    break
            if position > self.position:
                self.position = position
                await self._save(conn, None)

    async def _wait_caught_up(self) -> None:
        waiter = asyncio.ensure_future(self.caught_up.wait())
        stopper = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()
        if not self.caught_up.is_set():
            raise RetryLater("stopping before the catch-up ended")

    async def _positions(self, conn: asyncpg.Connection, events: Sequence[Event]) -> dict[UUID, int]:
        """Journal positions of the batch's events; after a catch-up, first wait until the journal holds one."""
        ids = [e.event_id for e in events]
        deadline = time.monotonic() + self.journal_wait_s
        while True:
            found = {r["event_id"]: r["position"] for r in await conn.fetch(POSITIONS, ids)}
            if found or not self.awaiting_marker:
                self.awaiting_marker = False
                return found
            if self.stopping.is_set():
                raise RetryLater("stopping")
            if time.monotonic() > deadline:
                self.failure = (f"the journal does not hold event {ids[0]} (queued for subscriber {self.subscriber}) "
                                f"after {self.journal_wait_s:g}s; is `sntrack consume journal` running? Nothing was "
                                "acked: run the subscriber again")
                self.stop()
                raise RetryLater(self.failure)
            await asyncio.sleep(POLL_S)



class SubscriberRuntime(ConsumerRuntime):
    """The consumer runtime, telling the subscriber which messages of a batch `sntrack dlq requeue` sent back. A
    dead-lettered event is behind the subscriber's position, which would otherwise mark its copy as delivered."""

    async def _handle(self, accepted: list[tuple[AbstractIncomingMessage, Event]], dlx) -> bool:
        self.handler.requeued = {event.event_id for message, event in accepted
                                 if (message.headers or {}).get(REQUEUED_HEADER)}
        return await super()._handle(accepted, dlx)


async def run_subscriber(subscriber: CatchUpSubscriber, runtime: ConsumerRuntime,
                         connection: aio_pika.abc.AbstractRobustConnection) -> None:
    """Bind (the runtime declares and binds the queue), catch up from the journal, then live until stopped.
    Stop it with subscriber.stop()."""
    subscriber._stop_runtime = runtime.stop
    consuming = asyncio.create_task(runtime.run(connection))
    try:
        ready = asyncio.ensure_future(runtime.ready.wait())
        await asyncio.wait({ready, consuming}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if consuming.done():
            consuming.result()  # raises why it could not start
            return
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        subscriber.dead_letters = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        started = time.perf_counter()
        with contextlib.suppress(RetryLater):  # stopped meanwhile
            await subscriber.catch_up()
        log.info("caught up from the journal", subscriber=subscriber.subscriber, position=subscriber.position,
                 events=subscriber.delivered["journal"], seconds=round(time.perf_counter() - started, 3))
        await consuming
        await subscriber.settle()
    finally:
        if not consuming.done():
            subscriber.stop()
            with contextlib.suppress(Exception):
                await consuming
    if subscriber.failure:
        raise ConfigurationError(subscriber.failure)
