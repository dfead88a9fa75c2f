"""The consumer runtime: queue → gate → batch → handler → ack, for any Handler.

- prefetch and natural batching: a batch is whatever has arrived, up to `batch_size`, so latency stays low at
  low rates and throughput high at high rates; prefetch is capped by a memory budget (`effective_prefetch`);
- the gate: invalid messages are published to the dead-letter exchange with the reason in a header, then
  acked; the consumer never crashes or loops on them;
- ack only after the handler committed; transient failures keep the batch unacked and retry with backoff;
  a batch that fails otherwise is split to find the culprit, which is dead-lettered as handler_error after
  HANDLER_ATTEMPTS tries, so one bad event never holds up the others;
- a message that crashes the process itself: with an AttemptLedger, every redelivered message is counted
  durably before it is handled and forgotten once settled. One in hand at CRASH_ATTEMPTS crashes is handled
  alone; alone for CRASH_ATTEMPTS more, it is dead-lettered as crashed_consumer. Restarts age nothing
  (tests/test_crash_loop.py);
- dead letters are published with confirms and mandatory: a missing, unbound or full dead-letter queue keeps
  the original unacked, retried with a backoff, logged and counted (tests/test_dead_letter_safety.py);
- graceful stop: stop consuming, finish the batch in hand, ack, close; a handler with a `stop()` (MLflow's)
  may instead finish only its calls in flight and leave the batch unacked (RetryLater). Unprocessed prefetched
  messages go back to the queue when the channel closes. A kill -9 loses nothing either: unacked messages are
  redelivered and the handler's bookkeeping turns the duplicates into no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from urllib.parse import unquote

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from common.amqp import amqp_refusal
from common.errors import ConfigurationError
from common.urls import path_name, redact
from consumers.attempts import AttemptLedger, message_key
from consumers.config import ConsumerConfig
from consumers.handler import DeadLetter, Handler, RetryLater
from consumers.persistence import TRANSIENT_ERRORS
from consumers.stages import StageLog, mark
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE, Event, GateRejection, parse_event
from schemas.topology import DETAIL_HEADER, REASON_HEADER

log = structlog.get_logger("sntrack.consumer")

MAX_BACKOFF_S = 5.0
DEAD_LETTER_MAX_BACKOFF_S = 10.0
HANDLER_ATTEMPTS = 3  # an event whose handler fails this often in a row is dead-lettered as handler_error
CRASH_ATTEMPTS = 3  # crashes with a message in hand before it is handled alone, and again before it is dead-lettered
CRASHED = "crashed_consumer"
MIB = 1024 * 1024
STOPPED = object()  # what a retried operation returns when the consumer is told to stop first


@dataclass
class ConsumerStats:
    batches: int = 0
    handled: int = 0
    dead_lettered: int = 0
    retries: int = 0
    dead_letter_failures: int = 0  # dead-letter publishes refused (queue missing, unbound or full) and retried
    reasons: dict[str, int] = field(default_factory=dict)


def effective_prefetch(config: ConsumerConfig) -> int:
    """Messages a consumer may hold unacked: `prefetch`, capped so that as many maximum-size bodies fit in
    `ConsumerConfig.memory_mb` (tests/test_memory_bound.py measures the resulting RSS)."""
    return max(1, min(config.prefetch, config.memory_mb * MIB // config.max_message_bytes))


async def connect(config: ConsumerConfig) -> aio_pika.abc.AbstractRobustConnection:
    try:
        return await aio_pika.connect_robust(config.amqp_url, timeout=10, reconnect_interval=1, client_properties={
            "connection_name": f"sntrack-{config.worker_id or 'consumer'}"})
    except Exception as exc:
        if refusal := amqp_refusal(exc, config.amqp_url):
            raise ConfigurationError(refusal) from None
        if not isinstance(exc, TimeoutError | OSError | aio_pika.exceptions.AMQPConnectionError):
            raise
        raise ConfigurationError(
            f"cannot reach RabbitMQ at {redact(config.amqp_url)} ({exc or type(exc).__name__}); is it running, "
            "and does the vhost exist (sntrack topology apply)?"
        ) from None


def _in_hand(message: AbstractIncomingMessage) -> bool:
    """Whether `message` can still be acked: a delivery of a closed channel is back in its queue."""
    try:
        message.channel  # noqa: B018 - raises once the channel is closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return False
    return True


def _event_fields(event: Event) -> dict:
    return {"event_id": str(event.event_id), "trial_id": event.trial_id, "event_type": event.event_type}


class ConsumerRuntime:
    def __init__(self, handler: Handler, config: ConsumerConfig, ledger: AttemptLedger | None = None):
        self.handler = handler
        self.config = config
        self.ledger = ledger
        self.prefetch = effective_prefetch(config)
        self.batch_size = min(config.batch_size, self.prefetch)
        self.stats = ConsumerStats()
        self.log = log.bind(consumer=handler.name, queue=handler.queue.name)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()
        self.gave_up = asyncio.Event()  # set by consumers.service.supervise when restarts did not help
        self.metrics = None  # a consumers.metrics.ConsumerMetrics while the daemon serves /metrics
        self.stage_log = StageLog(config.stage_log, handler.name) if config.stage_log else None

    def stop(self) -> None:
        self._stopping.set()
        # A handler whose batch takes long (MLflow's calls) stops starting new work when it has a stop().
        if stop_handler := getattr(self.handler, "stop", None):
            stop_handler()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def pause(self, seconds: float) -> None:
        """Sleep `seconds`, or less when told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    async def run(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        """Consume until stopped. May be called again after it raised: it starts on a fresh channel."""
        self._inbox = asyncio.Queue()  # deliveries of an earlier channel can no longer be acked
        if self.stage_log is not None:
            self.stage_log.restart()
        self.finished.clear()
        channels: list[aio_pika.abc.AbstractChannel] = []
        started = False
        try:
            channel = await connection.channel()
            channels.append(channel)
            # Dead letters go out on their own channel, confirmed, mandatory, and a return raises: a dead letter
            # the broker cannot place never counts as sent.
            dead_letters = await connection.channel(publisher_confirms=True, on_return_raises=True)
            channels.append(dead_letters)
            await channel.set_qos(prefetch_count=self.prefetch)
            try:
                queue = await self._open_queue(channel)
                consumer_tag = await queue.consume(self._inbox.put if self.stage_log is None else self._stamped_put)
            except aiormq.exceptions.ChannelAccessRefused as exc:
                raise ConfigurationError(
                    f"RabbitMQ refused the user of {redact(self.config.amqp_url)}: {exc}; built-in consumers run as "
                    "the consumer role's user, `sntrack subscribe` as the subscriber role's") from None
            dlx = await dead_letters.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
            started = True
            self.ready.set()
            self.log.info("consumer started", prefetch=self.prefetch, batch_size=self.batch_size)
            try:
                while not self._stopping.is_set():
                    batch = await self._next_batch()
                    if batch:
                        await self._process(batch, dlx)
            finally:
                with contextlib.suppress(Exception):
                    await queue.cancel(consumer_tag)
        finally:
            for each in channels:
                with contextlib.suppress(Exception):
                    await each.close()
            self.finished.set()
            if started:
                self.log.info("consumer stopped", **vars(self.stats))

    async def _open_queue(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        """The handler's queue. A built-in consumer's queue was declared and bound by `sntrack topology apply`: it
        is only checked (a passive declare, which needs no permission; the consumer role may configure nothing).
        A subscriber declares and binds its own queue and dead-letter queue here, idempotently."""
        spec = self.handler.queue
        if not spec.runtime_declares:
            try:
                return await channel.declare_queue(spec.name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                vhost = unquote(path_name(self.config.amqp_url)) or "/"
                raise ConfigurationError(f"queue {spec.name} does not exist in vhost {vhost!r}; an administrator "
                                         "declares it with `sntrack topology apply`") from None
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        dead = await channel.declare_queue(spec.dead_letter_queue, durable=True, arguments=spec.dead_letter_arguments)
        await dead.bind(DEAD_LETTER_EXCHANGE, routing_key=spec.name)
        for pattern in spec.bindings:
            await queue.bind(EXCHANGE, routing_key=pattern)
        return queue

    async def _stamped_put(self, message: AbstractIncomingMessage) -> None:
        self.stage_log.arrived(message)
        await self._inbox.put(message)

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        getter = asyncio.ensure_future(self._inbox.get())
        stopper = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if getter not in done:
            getter.cancel()
            return []
        batch = [getter.result()]
        while len(batch) < self.batch_size and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())
        return batch

    async def _process(self, batch: list[AbstractIncomingMessage], dlx: aio_pika.abc.AbstractExchange) -> None:
        if self.stage_log is None:
            await self._process_batch(batch, dlx)
            return
        with self.stage_log.batch():
            await self._process_batch(batch, dlx)

    async def _process_batch(self, batch: list[AbstractIncomingMessage], dlx: aio_pika.abc.AbstractExchange) -> None:
        crashes = await self._crash_counts(batch)
        if crashes is None:
            return  # stopping with the database away: everything stays unacked
        doomed = [m for m in batch if crashes.get(id(m), 0) >= 2 * CRASH_ATTEMPTS]
        suspects = [m for m in batch if CRASH_ATTEMPTS <= crashes.get(id(m), 0) < 2 * CRASH_ATTEMPTS]
        normal = [m for m in batch if crashes.get(id(m), 0) < CRASH_ATTEMPTS]
        for message in doomed:
            await self._dead_letter(message, dlx, CRASHED,
                                    f"the consumer died {crashes[id(message)]} times with this message in hand, "
                                    f"the last {CRASH_ATTEMPTS} times with it alone")
        if normal:
            await self._attempt(normal, dlx, ack_multiple=not doomed and not suspects)
        for message in suspects:  # one at a time, each counted only when its turn comes
            if self._stopping.is_set():
                return
            await self._attempt([message], dlx, ack_multiple=False)

    async def _crash_counts(self, batch: list[AbstractIncomingMessage]) -> dict[int, int] | None:
        """id(message) → crashes it was in hand for, for the redelivered messages of the batch."""
        redelivered = [m for m in batch if m.redelivered]
        if not redelivered or self.ledger is None:
            return {}
        counts = await self._durably(self.ledger.counts, [message_key(m) for m in redelivered])
        if counts is STOPPED:
            return None
        return {id(m): counts.get(message_key(m), 0) for m in redelivered}

    async def _durably(self, operation, *args):
        """Run a ledger operation, retrying while the database is away; STOPPED when stopping meanwhile."""
        backoff = 0.1
        while True:
            try:
                return await operation(*args)
            except TRANSIENT_ERRORS as exc:
                if self._stopping.is_set():
                    return STOPPED
                self.stats.retries += 1
                self.log.warning("database unavailable for the attempt ledger, retrying", error=repr(exc))
                await self.pause(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _attempt(self, batch: list[AbstractIncomingMessage], dlx, ack_multiple: bool) -> None:
        """Gate, handle and settle `batch`. A redelivered message is counted in the ledger before it is touched."""
        keys = [message_key(m) for m in batch if m.redelivered]
        if keys and self.ledger is not None and await self._durably(self.ledger.record, keys) is STOPPED:
            return
        accepted: list[tuple[AbstractIncomingMessage, Event]] = []
        for message in batch:
            try:
                accepted.append((message, parse_event(message.body, max_bytes=self.config.max_message_bytes)))
            except GateRejection as rejection:
                if not await self._dead_letter(message, dlx, rejection.reason, rejection.detail):
                    ack_multiple = False  # it stays unacked: a multiple ack must not settle it
        if not accepted:
            return
        mark("gated")
        if await self._handle(accepted, dlx):
            self.stats.batches += 1
            self.stats.handled += len(accepted)
            await self._forget([m for m, _ in accepted if m.redelivered])
            await self._ack_batch([m for m, _ in accepted], multiple=ack_multiple)
            self.log.debug("batch applied", events=len(accepted))
            if self.stage_log is not None:
                mark("acked")
                self.stage_log.applied(accepted)

    async def _ack_batch(self, messages: list[AbstractIncomingMessage], multiple: bool) -> None:
        if not multiple:
            for message in messages:
                await self._ack(message)
            return
        # One ack per open channel (a reconnect can mix two in a batch): multiple=True also settles the
        # channel's earlier deliveries, all of which this batch or an earlier one has already settled.
        # Deliveries of a closed channel are not acked: the broker redelivers them, bookkeeping dedupes.
        last_per_channel = {}
        for message in messages:
            with contextlib.suppress(ChannelInvalidStateError):
                last_per_channel[id(message.channel)] = message
        for message in last_per_channel.values():
            await self._ack(message, multiple=True)

    async def _forget(self, messages: list[AbstractIncomingMessage]) -> None:
        """Drop the ledger rows of settled messages (best effort: a row left behind names an acked message)."""
        if not messages or self.ledger is None:
            return
        try:
            await self.ledger.forget([message_key(m) for m in messages])
        except Exception as exc:  # noqa: BLE001 - the message is settled either way
            self.log.warning("could not clear attempt records", error=repr(exc))

    async def _handle(self, accepted: list[tuple[AbstractIncomingMessage, Event]], dlx) -> bool:
        """True when the whole batch is durable; False when it was settled otherwise (or must be left)."""
        backoff, failures = 0.1, 0
        while True:
            try:
                started = time.perf_counter()
                await self.handler.handle([event for _, event in accepted])
                if self.metrics is not None:
                    self.metrics.applied(self.handler.name, [e for _, e in accepted], time.perf_counter() - started)
                return True
            except (RetryLater, *TRANSIENT_ERRORS) as exc:
                if not self._stopping.is_set():
                    self.stats.retries += 1
                    self.log.warning("dependency unavailable, retrying batch", error=str(exc) or type(exc).__name__,
                                     events=len(accepted), backoff_s=backoff)
                    await self.pause(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                if self._stopping.is_set():
                    # Shutting down (a dependency away, or a handler that stopped partway): leave the batch unacked
                    # for the next run.
                    self.log.warning("stopping with an unapplied batch; it will be redelivered", error=str(exc))
                    return False
            except DeadLetter as exc:
                if len(accepted) > 1:
                    await self._one_by_one(accepted, dlx)
                    return False
                message, event = accepted[0]
                await self._dead_letter(message, dlx, exc.reason, exc.detail, event)
                return False
            except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the daemon
                if len(accepted) > 1:
                    await self._one_by_one(accepted, dlx)
                    return False
                failures += 1
                message, event = accepted[0]
                self.log.error("handler failed", error=repr(exc), attempt=failures, **_event_fields(event))
                if failures >= HANDLER_ATTEMPTS:
                    await self._dead_letter(message, dlx, "handler_error", repr(exc), event)
                    return False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def _one_by_one(self, accepted, dlx) -> None:
        for item in accepted:
            if await self._handle([item], dlx):
                self.stats.handled += 1
                if item[0].redelivered:
                    await self._forget([item[0]])
                await self._ack(item[0])

    async def _ack(self, message: AbstractIncomingMessage, multiple: bool = False) -> None:
        try:
            await message.ack(multiple=multiple)
        except Exception as exc:  # noqa: BLE001 - channel gone: the broker redelivers, bookkeeping dedupes
            self.log.warning("ack failed; the message will be redelivered", error=repr(exc))

    async def _dead_letter(self, message: AbstractIncomingMessage, dlx, reason: str, detail: str,
                           event: Event | None = None) -> bool:
        """Publish a copy to the dead-letter exchange, confirmed and routed, then ack the original. True once
        settled; False when stopping first (the original stays unacked and comes back)."""
        headers = dict(message.headers or {})
        headers.update({REASON_HEADER: str(reason), DETAIL_HEADER: detail[:1000],
                        "x-sntrack-consumer": self.handler.name,
                        "x-sntrack-routing-key": message.routing_key or ""})
        copy = aio_pika.Message(
            body=message.body, headers=headers, message_id=message.message_id, type=message.type,
            content_type=message.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=message.timestamp,
        )
        ids = _event_fields(event) if event else {"message_id": message.message_id}
        backoff = 0.5
        while True:
            if not _in_hand(message):  # its channel is gone: the broker redelivers it, and that copy is dead-lettered
                self.log.warning("the channel that delivered the message closed before its dead letter was sent; "
                                 "leaving it to its redelivery", reason=str(reason), **ids)
                return False
            try:
                await dlx.publish(copy, routing_key=self.handler.queue.name, mandatory=True, timeout=30)
                break
            except Exception as exc:  # noqa: BLE001 - returned, nacked, or channel error: keep the original
                self.stats.dead_letter_failures += 1
                self.log.error("dead-letter queue refused the message; keeping the original unacked and retrying "
                               f"(is {self.handler.queue.dead_letter_queue} missing, unbound or full?)",
                               reason=str(reason), error=repr(exc), retry_in_s=backoff, **ids)
                if self._stopping.is_set():
                    return False
                await self.pause(backoff)
                if self._stopping.is_set():
                    return False
                backoff = min(backoff * 2, DEAD_LETTER_MAX_BACKOFF_S)
        self.stats.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.dead_lettered(self.handler.name, event, str(reason))
        self.stats.reasons[str(reason)] = self.stats.reasons.get(str(reason), 0) + 1
        self.log.warning("message dead-lettered", reason=str(reason), detail=detail[:300], **ids)
        if message.redelivered:
            await self._forget([message])
        await self._ack(message)
        return True
