"""Dead letters: read, requeue and purge the messages of a dead-letter queue (`sntrack dlq`).

Reading is not destructive: messages are fetched with basic.get on one channel and never acked, and closing the
channel hands every one of them back, in order, at the head of the queue. Each read counts one delivery on the
dead-letter queue's copies (the quorum queue's x-delivery-count); the dead-letter queues have no delivery limit,
so the count has no effect (consumers.topology.QueueSpec.dead_letter_arguments).

Requeue publishes a copy, with publisher confirms and mandatory, to the queue the message died in (through the
default exchange, so no other consumer gets it twice), or, for ml.events.unrouted, to ml.events with its routing
key. The dead letter is acked only after the broker confirmed its copy. A requeue cut half-way loses nothing: what
was not confirmed stays in the dead-letter queue; a crash between a confirm and its ack leaves a copy in both places,
which the consumer's event-id bookkeeping (applied_events; the journal's UNIQUE event_id) turns into a no-op
(tests/test_dlq.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from common.errors import ConfigurationError
from consumers.broker_admin import UNROUTED
from schemas.topology import DETAIL_HEADER, EXCHANGE, REASON_HEADER

DLQ_SUFFIX = ".dlq"
REQUEUED_HEADER = "x-sntrack-requeued"  # how many times `sntrack dlq requeue` sent this message back
PREVIOUS_REASON_HEADER = "x-sntrack-previous-reason"  # the reason it had when it was last requeued
# Headers of a death that a requeued copy leaves behind: it dies again with a fresh reason, or not at all.
DEATH_HEADERS = (REASON_HEADER, DETAIL_HEADER, "x-sntrack-consumer", "x-sntrack-routing-key", "x-death",
                 "x-delivery-count", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason")
REQUEUE_WINDOW = 200  # copies published before their confirms are awaited
GET_TIMEOUT_S = 10.0


def _count(value: object) -> int:
    """A counting header (x-death count, x-delivery-count, x-sntrack-requeued) as sent by anyone: 0 unless a
    whole number, so one hostile header cannot make the dead-letter queue unreadable."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def _text(value: object) -> str | None:
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Death:
    """One x-death entry, set by the broker when it dead-lettered the message (delivery_limit, maxlen, ...)."""

    queue: str | None
    reason: str | None
    count: int
    time: str | None
    routing_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeadLetterInfo:
    queue: str
    index: int  # its place in the queue when read (0: the head)
    reason: str | None  # x-sntrack-reason (the runtime's), else the broker's newest x-death reason
    detail: str | None
    consumer: str | None  # the consumer that dead-lettered it (x-sntrack-consumer)
    deaths: tuple[Death, ...]
    requeued: int
    previous_reason: str | None
    delivery_count: int  # x-delivery-count: reads of this copy (including `sntrack dlq list`)
    event_id: str | None
    event_type: str | None
    message_id: str | None
    routing_key: str | None
    body: bytes = field(repr=False)

    @property
    def key(self) -> str:
        """What identifies it to a person: the event id, else the message id, else its place."""
        return self.event_id or self.message_id or f"#{self.index}"


def describe(queue: str, index: int, message: AbstractIncomingMessage) -> DeadLetterInfo:
    headers = dict(message.headers or {})
    deaths = tuple(
        Death(_text(d.get("queue")), _text(d.get("reason")), _count(d.get("count")), _text(d.get("time")),
              tuple(_text(k) or "" for k in d.get("routing-keys") or ()))
        for d in headers.get("x-death") or () if isinstance(d, dict))
    event_id = event_type = None
    with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
        body = json.loads(message.body)
        if isinstance(body, dict):
            event_id, event_type = _text(body.get("event_id")), _text(body.get("event_type"))
    reason = _text(headers.get(REASON_HEADER)) or (deaths[0].reason if deaths else None)
    original_key = _text(headers.get("x-sntrack-routing-key")) or (
        deaths[0].routing_keys[0] if deaths and deaths[0].routing_keys else message.routing_key)
    return DeadLetterInfo(
        queue=queue, index=index, reason=reason, detail=_text(headers.get(DETAIL_HEADER)),
        consumer=_text(headers.get("x-sntrack-consumer")), deaths=deaths,
        requeued=_count(headers.get(REQUEUED_HEADER)), previous_reason=_text(headers.get(PREVIOUS_REASON_HEADER)),
        delivery_count=_count(headers.get("x-delivery-count")), event_id=event_id,
        event_type=event_type or (original_key if queue == UNROUTED else None), message_id=message.message_id,
        routing_key=original_key, body=message.body)


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on: a reason, an event or message id, at most `limit` (None: all)."""

    reason: str | None = None
    ids: frozenset[str] = frozenset()
    limit: int | None = None

    def matches(self, info: DeadLetterInfo) -> bool:
        return ((self.reason is None or info.reason == self.reason)
                and (not self.ids or bool({info.event_id, info.message_id} & self.ids)))


def dead_letter_queue(name: str, consumer_queues: dict[str, str]) -> str:
    """The dead-letter queue `name` means: a consumer name (trials), its queue (sntrack.trials), the dead-letter
    queue itself (sntrack.trials.dlq) or ml.events.unrouted."""
    if name in consumer_queues:
        return consumer_queues[name] + DLQ_SUFFIX
    if name == UNROUTED or name.endswith(DLQ_SUFFIX):
        return name
    return name + DLQ_SUFFIX


async def depth(connection: aio_pika.abc.AbstractConnection, queue: str) -> int | None:
    """Ready messages in `queue` (a passive declare on a channel of its own), None when it does not exist."""
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except ValueError:  # refused by the client before sending: too long, or a character AMQP cannot name
        raise ConfigurationError(f"not a queue name AMQP can carry: {queue!r}") from None
    except aio_pika.exceptions.ChannelClosed:
        return None
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return declared.declaration_result.message_count


async def _existing(connection: aio_pika.abc.AbstractConnection, queue: str) -> int:
    found = await depth(connection, queue)
    if found is None:
        raise ConfigurationError(f"no dead-letter queue {queue} in this vhost (see `sntrack dlq list`)")
    return found


async def read(channel: AbstractChannel, queue: str, available: int,
               selection: Selection) -> AsyncIterator[tuple[AbstractIncomingMessage, DeadLetterInfo]]:
    """The selected messages among the first `available` of `queue`, unacked: the caller acks what it settles,
    and closing `channel` returns the rest. Reading stops at `available`, so copies that die again meanwhile
    (appended behind) are not read twice."""
    source = await channel.get_queue(queue, ensure=False)
    taken = 0
    for index in range(available):
        if selection.limit is not None and taken >= selection.limit:
            return
        message = await source.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_S)
        if message is None:
            return
        info = describe(queue, index, message)
        if selection.matches(info):
            taken += 1
            yield message, info


async def peek(connection: aio_pika.abc.AbstractConnection, queue: str, selection: Selection) -> list[DeadLetterInfo]:
    """The selected dead letters of `queue`, left in place."""
    available = await _existing(connection, queue)
    channel = await connection.channel()
    try:
        return [info async for _, info in read(channel, queue, available, selection)]
    finally:
        await channel.close()  # every message goes back


def requeued_copy(message: AbstractIncomingMessage, info: DeadLetterInfo) -> aio_pika.Message:
    headers = {k: v for k, v in (message.headers or {}).items() if k not in DEATH_HEADERS}
    headers[REQUEUED_HEADER] = info.requeued + 1
    if info.reason:
        headers[PREVIOUS_REASON_HEADER] = info.reason
    return aio_pika.Message(body=message.body, headers=headers, message_id=message.message_id, type=message.type,
                            content_type=message.content_type, timestamp=message.timestamp,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)


@dataclass
class RequeueResult:
    queue: str
    target: str
    requeued: list[DeadLetterInfo] = field(default_factory=list)
    error: str | None = None  # why it stopped early; what was not requeued is still in the dead-letter queue


async def requeue(connection: aio_pika.abc.AbstractConnection, queue: str, selection: Selection) -> RequeueResult:
    """Send the selected dead letters of `queue` back where they died; each is acked only once its copy is
    confirmed. Stops at the first copy the broker refuses (the rest stay where they are)."""
    available = await _existing(connection, queue)
    unrouted = queue == UNROUTED
    result = RequeueResult(queue, f"{EXCHANGE} (by routing key)" if unrouted else queue.removesuffix(DLQ_SUFFIX))
    reader = await connection.channel()
    try:
        publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await publisher.get_exchange(EXCHANGE, ensure=False) if unrouted else publisher.default_exchange
        window: list[tuple[AbstractIncomingMessage, DeadLetterInfo]] = []

        async def settle() -> None:
            outcomes = await asyncio.gather(*(
                exchange.publish(requeued_copy(m, info), mandatory=True, timeout=30,
                                 routing_key=(info.routing_key or "") if unrouted else result.target)
                for m, info in window), return_exceptions=True)
            lost = next((o for o in outcomes if isinstance(o, BaseException)
                         and not isinstance(o, aio_pika.exceptions.DeliveryError)), None)
            if lost is not None:
                raise lost  # the connection, not the broker's answer: nothing more can be settled
            for (message, info), outcome in zip(window, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    result.error = result.error or _refusal(outcome, result.target)
                    continue  # not confirmed: the dead letter stays
                await message.ack()
                result.requeued.append(info)
            window.clear()

        async for item in read(reader, queue, available, selection):
            window.append(item)
            if len(window) >= REQUEUE_WINDOW:
                await settle()
                if result.error:
                    break
        if window and not result.error:
            await settle()
        with contextlib.suppress(Exception):
            await publisher.close()
    finally:
        with contextlib.suppress(Exception):
            await reader.close()
    return result


def _refusal(exc: BaseException, target: str) -> str:
    if isinstance(exc, aio_pika.exceptions.DeliveryError):
        return f"the broker refused the copy for {target} (does the queue exist, is it full?): {exc}"
    return f"requeue to {target} failed: {exc!r}"


async def purge(connection: aio_pika.abc.AbstractConnection, queues: Sequence[str], selection: Selection,
                confirm: Callable[[dict[str, int]], bool]) -> dict[str, int] | None:
    """Delete the selected dead letters of `queues` once `confirm({queue: count})` (run in a thread: it may ask a
    person) says yes, and return those counts; None when it says no. Exactly the messages counted are deleted:
    they stay held, unacked, while it asks."""
    channels: list[AbstractChannel] = []
    held: dict[str, list[int]] = {}
    try:
        for queue in queues:
            available = await _existing(connection, queue)
            channel = await connection.channel()
            channels.append(channel)
            held[queue] = [m.delivery_tag async for m, _ in read(channel, queue, available, selection)]
        counts = {queue: len(tags) for queue, tags in held.items() if tags}
        if not counts:
            return {}
        if not await asyncio.to_thread(confirm, counts):
            return None
        for channel, tags in zip(channels, held.values(), strict=True):
            underlay = await channel.get_underlay_channel()
            for tag in tags:
                await underlay.basic_ack(delivery_tag=tag)
            await channel.close()  # answered (close-ok) after the broker took the acks sent before it
        return counts
    finally:
        for channel in channels:
            with contextlib.suppress(Exception):
                await channel.close()
