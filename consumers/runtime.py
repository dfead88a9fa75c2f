"""The consumer runtime: queue → gate → batch → handler → ack, for any Handler.

- prefetch and natural batching: a batch is whatever has arrived, up to `batch_size`, so latency stays low at
  low rates and throughput high at high rates;
- the gate: invalid messages are published to the dead-letter exchange with the reason in a header, then
  acked; the consumer never crashes or loops on them;
- ack only after the handler committed; transient failures keep the batch unacked and retry with backoff;
  a batch that fails otherwise is split to find the culprit, which is dead-lettered as handler_error after
  HANDLER_ATTEMPTS tries, so one bad event never holds up the others;
- graceful stop: stop consuming, finish the batch in hand, ack, close. Unprocessed prefetched messages go back
  to the queue when the channel closes. A kill -9 loses nothing either: unacked messages are redelivered and
  the handler's bookkeeping turns the duplicates into no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelInvalidStateError

from consumers.handler import DeadLetter, Handler, RetryLater
from consumers.persistence import TRANSIENT_ERRORS
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE, Event, GateRejection, parse_event
from schemas.topology import DETAIL_HEADER, REASON_HEADER
from sntrack.refusal import amqp_refusal
from sntrack.settings import ConfigurationError, Settings, redact

log = structlog.get_logger("sntrack.consumer")

MAX_BACKOFF_S = 5.0
HANDLER_ATTEMPTS = 3  # an event whose handler fails this often in a row is dead-lettered as handler_error


@dataclass
class ConsumerStats:
    batches: int = 0
    handled: int = 0
    dead_lettered: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


async def connect(settings: Settings) -> aio_pika.abc.AbstractRobustConnection:
    try:
        return await aio_pika.connect_robust(settings.amqp_url, timeout=10, reconnect_interval=1, client_properties={
            "connection_name": f"sntrack-{settings.worker_id or 'consumer'}"})
    except Exception as exc:
        if refusal := amqp_refusal(exc, settings.amqp_url):
            raise ConfigurationError(refusal) from None
        if not isinstance(exc, TimeoutError | OSError | aio_pika.exceptions.AMQPConnectionError):
            raise
        raise ConfigurationError(
            f"cannot reach RabbitMQ at {redact(settings.amqp_url)} ({exc or type(exc).__name__}); is it running, "
            "and does the vhost exist (sntrack topology apply)?"
        ) from None


def _event_fields(event: Event) -> dict:
    return {"event_id": str(event.event_id), "trial_id": event.trial_id, "event_type": event.event_type}


class ConsumerRuntime:
    def __init__(self, handler: Handler, settings: Settings):
        self.handler = handler
        self.settings = settings
        self.stats = ConsumerStats()
        self.log = log.bind(consumer=handler.name, queue=handler.queue.name)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.finished = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, connection: aio_pika.abc.AbstractRobustConnection) -> None:
        spec = self.handler.queue
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        # Declared (idempotently) here too, so a new subscriber needs nothing beyond the exchanges.
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        dead = await channel.declare_queue(spec.dead_letter_queue, durable=True, arguments=spec.dead_letter_arguments)
        await dead.bind(DEAD_LETTER_EXCHANGE, routing_key=spec.name)
        for pattern in spec.bindings:
            await queue.bind(EXCHANGE, routing_key=pattern)
        dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        consumer_tag = await queue.consume(self._inbox.put)
        self.ready.set()
        self.log.info("consumer started", prefetch=self.settings.prefetch, batch_size=self.settings.batch_size)
        try:
            while not self._stopping.is_set():
                batch = await self._next_batch()
                if batch:
                    await self._process(batch, dlx)
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(consumer_tag)
            with contextlib.suppress(Exception):
                await channel.close()
            self.finished.set()
            self.log.info("consumer stopped", **vars(self.stats))

    async def _next_batch(self) -> list[AbstractIncomingMessage]:
        getter = asyncio.ensure_future(self._inbox.get())
        stopper = asyncio.ensure_future(self._stopping.wait())
        done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if getter not in done:
            getter.cancel()
            return []
        batch = [getter.result()]
        while len(batch) < self.settings.batch_size and not self._inbox.empty():
            batch.append(self._inbox.get_nowait())
        return batch

    async def _process(self, batch: list[AbstractIncomingMessage], dlx: aio_pika.abc.AbstractExchange) -> None:
        accepted: list[tuple[AbstractIncomingMessage, Event]] = []
        for message in batch:
            try:
                accepted.append((message, parse_event(message.body, max_bytes=self.settings.max_message_bytes)))
            except GateRejection as rejection:
                await self._dead_letter(message, dlx, rejection.reason, rejection.detail)
        if not accepted:
            return
        if await self._handle(accepted, dlx):
            self.stats.batches += 1
            self.stats.handled += len(accepted)
            # One ack per open channel (a reconnect can mix two in a batch): multiple=True also settles the
            # channel's earlier deliveries, all of which this batch or an earlier one has already settled.
            # Deliveries of a closed channel are not acked: the broker redelivers them, bookkeeping dedupes.
            last_per_channel = {}
            for message, _ in accepted:
                with contextlib.suppress(ChannelInvalidStateError):
                    last_per_channel[id(message.channel)] = message
            for message in last_per_channel.values():
                await self._ack(message, multiple=True)
            self.log.debug("batch applied", events=len(accepted))

    async def _handle(self, accepted: list[tuple[AbstractIncomingMessage, Event]], dlx) -> bool:
        """True when the whole batch is durable; False when it was settled otherwise (or must be left)."""
        backoff, failures = 0.1, 0
        while True:
            try:
                await self.handler.handle([event for _, event in accepted])
                return True
            except (RetryLater, *TRANSIENT_ERRORS) as exc:
                if self._stopping.is_set():
                    # Shutting down with a dependency away: leave the batch unacked for the next run.
                    self.log.warning("stopping with an unapplied batch; it will be redelivered", error=str(exc))
                    return False
                self.stats.retries += 1
                self.log.warning("dependency unavailable, retrying batch", error=str(exc) or type(exc).__name__,
                                 events=len(accepted), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
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
                await self._ack(item[0])

    async def _ack(self, message: AbstractIncomingMessage, multiple: bool = False) -> None:
        try:
            await message.ack(multiple=multiple)
        except Exception as exc:  # noqa: BLE001 - channel gone: the broker redelivers, bookkeeping dedupes
            self.log.warning("ack failed; the message will be redelivered", error=repr(exc))

    async def _dead_letter(self, message: AbstractIncomingMessage, dlx, reason: str, detail: str,
                           event: Event | None = None) -> None:
        headers = dict(message.headers or {})
        headers.update({REASON_HEADER: str(reason), DETAIL_HEADER: detail[:1000],
                        "x-sntrack-consumer": self.handler.name,
                        "x-sntrack-routing-key": message.routing_key or ""})
        copy = aio_pika.Message(
            body=message.body, headers=headers, message_id=message.message_id, type=message.type,
            content_type=message.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            timestamp=message.timestamp,
        )
        try:
            await dlx.publish(copy, routing_key=self.handler.queue.name)
        except Exception as exc:  # noqa: BLE001 - keep the original; it is redelivered and judged again
            self.log.error("could not dead-letter; leaving the message in the queue", error=repr(exc))
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        self.stats.dead_lettered += 1
        self.stats.reasons[str(reason)] = self.stats.reasons.get(str(reason), 0) + 1
        ids = _event_fields(event) if event else {"message_id": message.message_id}
        self.log.warning("message dead-lettered", reason=str(reason), detail=detail[:300], **ids)
        await self._ack(message)
