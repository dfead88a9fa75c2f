"""What a consumer daemon tells Prometheus, and whether it is ready (served by common.ops_http.OpsServer).

Counted as it happens (the runtime calls `applied` and `dead_lettered`): events by consumer, type and outcome, the
handler's latency per batch, batch sizes, dead letters by reason. Sampled at each scrape (`sample`): each queue's
ready messages and its dead-letter queue's (passive declares, so no management API is needed), and each consumer's
position and lag on the journal (consumers.lag).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import aio_pika
import asyncpg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers import lag
from schemas import Event

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
CHECK_TIMEOUT_S = 2.0
INVALID = "invalid"  # the event type label of a message the gate refused: no type can be trusted


class ConsumerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events = Counter("sntrack_consumer_events", "Events a consumer settled, by event type and outcome "
                              "(applied: its batch committed; dead_lettered)", ["consumer", "event_type", "outcome"],
                              registry=r)
        self.dead_letters = Counter("sntrack_consumer_dead_letters", "Messages a consumer dead-lettered, by reason",
                                    ["consumer", "reason"], registry=r)
        self.handler_seconds = Histogram("sntrack_consumer_handler_seconds", "Time a consumer's handler took to "
                                         "apply one batch", ["consumer"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("sntrack_consumer_batch_size", "Events per applied batch", ["consumer"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_ready = Gauge("sntrack_queue_ready_messages", "Messages waiting in a consumer's queue (lag as "
                                 "queue depth), sampled at scrape", ["queue"], registry=r)
        self.dead_letter_depth = Gauge("sntrack_dead_letter_messages", "Messages in a consumer queue's dead-letter "
                                       "queue, sampled at scrape", ["queue"], registry=r)
        self.journal_head = Gauge("sntrack_journal_head_position", "The journal's newest position", registry=r)
        self.position = Gauge("sntrack_consumer_position", "Journal position of the newest journal event of the "
                              "consumer's types that it applied", ["consumer"], registry=r)
        self.lag = Gauge("sntrack_consumer_lag_events", "Journal events of the consumer's types after its position "
                         "(journal head minus position)", ["consumer"], registry=r)
        self.ready = Gauge("sntrack_ready", "1 while connected to the broker and the database and consuming",
                           registry=r)
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._attached: tuple | None = None

    def attach(self, connection: aio_pika.abc.AbstractRobustConnection, pool: asyncpg.Pool, runtimes) -> None:
        """Count what `runtimes` do; sample and check through their connection and pool
        (consumers.service.running_handlers calls it once they are built)."""
        self._attached = (connection, pool, list(runtimes))
        for runtime in runtimes:
            runtime.metrics = self

    # -- counted by the runtime ---------------------------------------------------------------------------------

    def applied(self, consumer: str, events: Sequence[Event], seconds: float) -> None:
        self.handler_seconds.labels(consumer).observe(seconds)
        self.batch_size.labels(consumer).observe(len(events))
        for event in events:
            self.events.labels(consumer, event.event_type, "applied").inc()

    def dead_lettered(self, consumer: str, event: Event | None, reason: str) -> None:
        self.events.labels(consumer, event.event_type if event else INVALID, "dead_lettered").inc()
        self.dead_letters.labels(consumer, reason).inc()

    # -- sampled at each scrape, on the daemon's event loop ------------------------------------------------------

    async def sample(self) -> None:
        if self._attached is None:
            return
        connection, pool, runtimes = self._attached
        specs = [r.handler.queue for r in runtimes]
        if self._channel is None or self._channel.is_closed:
            self._channel = await connection.channel()
        # On the underlying channel: a robust channel answers a repeated passive declare from its cache.
        underlay = await self._channel.get_underlay_channel()
        for spec in specs:
            for name, gauge in ((spec.name, self.queue_ready), (spec.dead_letter_queue, self.dead_letter_depth)):
                declared = await asyncio.wait_for(underlay.queue_declare(name, passive=True), CHECK_TIMEOUT_S)
                gauge.labels(spec.name).set(declared.message_count)
        async with pool.acquire(timeout=CHECK_TIMEOUT_S) as conn:
            self.journal_head.set(await lag.journal_head(conn))
            for each in await lag.lags(conn, [(r.handler.name, r.handler.queue.bindings) for r in runtimes]):
                self.position.labels(each.consumer).set(each.position)
                self.lag.labels(each.consumer).set(each.events)

    async def health(self) -> dict[str, bool]:
        """broker: the connection is up; database: a query answers; consuming: every consumer runs."""
        if self._attached is None:
            self.ready.set(0)
            return {"broker": False, "database": False, "consuming": False}  # still starting
        connection, pool, runtimes = self._attached
        broker = not connection.is_closed and connection.connected.is_set()
        database = False
        with contextlib.suppress(Exception):
            async with pool.acquire(timeout=CHECK_TIMEOUT_S) as conn:
                database = await conn.fetchval("SELECT true", timeout=CHECK_TIMEOUT_S)
        consuming = bool(runtimes) and all(r.ready.is_set() and not r.finished.is_set() and not r.gave_up.is_set()
                                           for r in runtimes)
        checks = {"broker": broker, "database": bool(database), "consuming": consuming}
        self.ready.set(all(checks.values()))
        return checks
