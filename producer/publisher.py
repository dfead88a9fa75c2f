"""EventPublisher: confirmed, persistent publishing for synchronous training code, spooling when the broker is away.

    with EventPublisher(settings) as publisher:   # start(); close() on exit
        publisher.publish(event)                  # never blocks on the network, never raises for the broker

Inside, a daemon thread runs an asyncio loop with two tasks. The connection task keeps one AMQP connection
(its own reconnect loop with backoff) and a channel with publisher confirms. The dispatcher moves events out
of the bounded in-memory buffer:

- direct mode (connected, spool empty): publish in batches (mandatory, persistent) and await the confirms; a
  failure of any kind (connection loss, confirm timeout, nack, unroutable return) spools what was not
  confirmed and switches to spool mode;
- spool mode: the buffer is written to the spool (producer/spool.py), and, while connected, the spool is
  drained in order; once it is empty, back to direct mode. New events therefore always queue behind older
  spooled ones, which keeps each trial's events in order.

When the buffer is full, publish() writes to the spool itself (with whatever is buffered or in flight ahead
of it, so order holds), still without touching the network. Every event is confirmed, spooled, or (while the
publisher runs) on its way to one of the two; close() spools anything still in memory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass

import aio_pika
import structlog

from producer.emitter import producer_info
from producer.spool import Record, Spool
from schemas import EXCHANGE, Event
from sntrack.refusal import amqp_refusal
from sntrack.settings import Settings, redact

log = structlog.get_logger("sntrack.publisher")

BATCH = 500  # events published concurrently before awaiting their confirms
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 5.0
FIRST_CONTACT_S = 5.0  # how long to wait to tell a refusing broker (configuration) from an absent one
HEALTHY_CONNECTION_S = 10.0  # a connection that lived this long resets the reconnect backoff


@dataclass(frozen=True)
class PublisherStats:
    published: int  # publish() calls
    confirmed: int  # confirmed by the broker when first sent
    spooled: int  # written durably to the spool instead
    flushed_from_spool: int  # drained from the spool (adopted orphans included) and confirmed
    pending: int  # published but neither confirmed nor spooled yet
    connected: bool
    refused: str | None  # the broker answered but refused us (credentials, vhost): configuration, not an outage


class EventPublisher:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._spool = Spool(settings.spool_dir)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # counters, _spooling and _connected
        # Held by everything that appends to the spool, taken before _lock: spool order = publish order.
        self._order_lock = threading.Lock()
        self._buffer: deque[Record] = deque()
        self._inflight: list[Record] | None = None  # the direct batch awaiting confirms
        self._inflight_spooled = False  # an overflow already spooled it
        self._spooling = False
        self._connected = False
        self._refused: str | None = None
        self._attempts = 0  # failed connection attempts
        self._published = self._confirmed = self._spooled = self._from_spool = 0
        self._state = "new"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_ready = threading.Event()
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    # -- the synchronous API ---------------------------------------------------------------------------------

    def start(self) -> EventPublisher:
        """Adopt orphaned spool segments and start the publishing thread. Returns at once, broker or not."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"EventPublisher already {self._state}")
            self._state = "running"
        self._adopt_orphans()
        self._thread = threading.Thread(target=self._thread_main, name="sntrack-publisher", daemon=True)
        self._thread.start()
        self._loop_ready.wait()
        atexit.register(self.close)
        if self._buffer:
            self._wake()
        return self

    def publish(self, event: Event) -> None:
        """Hand an event over; it is confirmed by the broker or spooled durably in the background."""
        record = Record.from_event(event)
        with self._lock:
            if self._state == "closed":
                raise RuntimeError("publish() on a closed EventPublisher")
            self._published += 1
            if len(self._buffer) < self.settings.publish_buffer:
                self._buffer.append(record)
                if len(self._buffer) == 1:
                    self._wake()
                return
        self._overflow(record)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published so far is confirmed or spooled; False if `timeout` ran out first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending() == 0, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything is confirmed by the broker, the spool (adopted orphans included) emptied too."""
        with self._changed:
            return self._changed.wait_for(lambda: self._pending() == 0 and not self._spooling, timeout)

    def close(self, timeout: float | None = 30.0) -> bool:
        """Flush (and, while connected, drain the spool) within `timeout`, then stop the thread; anything
        still in memory is spooled. True when every published event is confirmed or spooled."""
        with self._lock:
            previous, self._state = self._state, "closed"
        if previous == "closed":
            return self.stats.pending == 0
        deadline = None if timeout is None else time.monotonic() + timeout
        if previous == "running":
            self.flush(timeout)
            if self.stats.connected:
                self.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))
            self._loop.call_soon_threadsafe(self._request_stop)
            self._thread.join()
            atexit.unregister(self.close)
        else:
            with self._order_lock:
                self._spill_locked()
        if not self._spool.is_empty():
            log.info("events remain spooled; the next publisher on this spool dir delivers them",
                     spool_dir=str(self.settings.spool_dir))
        self._spool.close()
        return self.stats.pending == 0

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._published, self._confirmed, self._spooled, self._from_spool,
                                  self._pending(), self._connected, self._refused)

    def first_contact(self, timeout: float = FIRST_CONTACT_S) -> str | None:
        """Wait up to `timeout` for the first connection attempt to be decided. Returns why the broker refused
        us (wrong credentials, unknown vhost), or None: connected, or merely unreachable (events spool)."""
        with self._changed:
            self._changed.wait_for(lambda: self._connected or self._refused or self._attempts > 0, timeout)
            return self._refused

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- shared between the caller's thread and the publishing thread -----------------------------------------

    def _pending(self) -> int:
        return self._published - self._confirmed - self._spooled

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _overflow(self, record: Record) -> None:
        """Buffer full: spool now, behind what is in flight and buffered."""
        with self._order_lock:
            with self._lock:
                records = []
                if self._inflight is not None and not self._inflight_spooled:
                    records.extend(self._inflight)
                    self._inflight_spooled = True
                records.extend(self._buffer)
                records.append(record)
                self._buffer.clear()
                self._spooling = True
            self._write_spool(records)
        self._wake()

    def _write_spool(self, records: list[Record]) -> bool:
        """Append to the spool; hold _order_lock. On a disk error the records go back to the buffer's head."""
        try:
            self._spool.append(records)
        except OSError as exc:
            log.error("cannot write the spool; keeping events in memory", spool_dir=str(self.settings.spool_dir),
                      error=str(exc))
            with self._lock:
                self._buffer.extendleft(reversed(records))
            return False
        with self._changed:
            self._spooled += len(records)
            self._changed.notify_all()
        return True

    def _spill_locked(self) -> bool:
        with self._lock:
            records = list(self._buffer)
            self._buffer.clear()
        return self._write_spool(records) if records else True

    def _spill(self) -> bool:
        with self._order_lock:
            return self._spill_locked()

    def _adopt_orphans(self) -> None:
        with self._order_lock:
            self._spool.adopt_orphans()
            if not self._spool.is_empty():
                self._set_spooling()

    def _set_spooling(self) -> None:
        with self._changed:
            self._spooling = True
            self._changed.notify_all()

    def _settle_direct(self, batch: list[Record], failed: list[Record]) -> None:
        with self._order_lock:
            with self._lock:
                self._inflight = None
                if self._inflight_spooled:
                    return  # counted when the overflow spooled it; any confirmed ones are duplicates later
            if failed:
                self._set_spooling()
                self._write_spool(failed)
            with self._changed:
                self._confirmed += len(batch) - len(failed)
                self._changed.notify_all()

    def _leave_spooling(self) -> bool:
        with self._order_lock:
            if not self._spool.release_if_drained():
                return False
            with self._changed:
                self._spooling = False
                self._changed.notify_all()
        log.info("spool drained; publishing directly again")
        return True

    # -- the publishing thread --------------------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._lost = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop_ready.set()
        connection_task = asyncio.create_task(self._maintain_connection())
        try:
            await self._dispatch()
        finally:
            self._request_stop()
            connection_task.cancel()  # it may be in the middle of a connect attempt
            with contextlib.suppress(asyncio.CancelledError):
                await connection_task

    def _request_stop(self) -> None:
        self._stopping.set()
        self._wakeup.set()
        self._lost.set()

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self._wakeup.clear()
            with self._lock:
                spooling, buffered = self._spooling, bool(self._buffer)
            exchange = self._exchange
            try:
                if spooling and buffered:
                    if not await asyncio.to_thread(self._spill):
                        await self._sleep(1.0)
                    continue
                if exchange is not None and spooling:
                    await self._drain_chunk(exchange)
                    continue
                if exchange is not None and buffered:
                    await self._send_direct(exchange)
                    continue
            except Exception as exc:  # any failure to get a confirm: spool, then reconnect
                log.warning("publish failed; spooling until the broker confirms again",
                            error=f"{type(exc).__name__}: {exc}"[:300])
                self._set_spooling()
                self._lost.set()
                continue
            await self._wakeup.wait()
        with self._lock:
            self._spooling = True
        await asyncio.to_thread(self._spill)

    async def _publish(self, exchange: aio_pika.abc.AbstractExchange, record: Record) -> None:
        message = aio_pika.Message(
            record.body, message_id=record.event_id, type=record.event_type, content_type="application/json",
            timestamp=record.occurred_at, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=record.event_type, mandatory=True,
                               timeout=self.settings.publish_confirm_timeout_s)

    async def _send_direct(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        with self._lock:
            batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
            self._inflight, self._inflight_spooled = batch, False
        results = await asyncio.gather(*(self._publish(exchange, r) for r in batch), return_exceptions=True)
        failed = [record for record, result in zip(batch, results, strict=True) if isinstance(result, Exception)]
        await asyncio.to_thread(self._settle_direct, batch, failed)
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _drain_chunk(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        chunk = await asyncio.to_thread(self._spool.next_chunk, BATCH)
        if chunk is None:
            await asyncio.to_thread(self._leave_spooling)
            return
        results = await asyncio.gather(*(self._publish(exchange, r) for r in chunk.records), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                raise result
        await asyncio.to_thread(self._spool.commit, chunk)
        with self._changed:
            self._from_spool += len(chunk.records)
            self._changed.notify_all()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _maintain_connection(self) -> None:
        url = self.settings.amqp_url
        name = f"sntrack-publisher-{self.settings.worker_id or producer_info().worker_id}"
        delay = RECONNECT_MIN_S
        unreachable_logged = False
        while not self._stopping.is_set():
            self._lost.clear()
            try:
                connection = await aio_pika.connect(url, timeout=self.settings.publish_confirm_timeout_s,
                                                    client_properties={"connection_name": name})
            except Exception as exc:
                with self._changed:
                    self._attempts += 1
                    self._refused = amqp_refusal(exc, url)
                    self._changed.notify_all()
                self._set_spooling()
                self._wakeup.set()
                if not unreachable_logged and self._refused is None:  # a refusal is the caller's to report
                    log.warning("broker unreachable; spooling events and retrying", url=redact(url),
                                error=f"{type(exc).__name__}: {exc}"[:300], spool_dir=str(self.settings.spool_dir))
                    unreachable_logged = True
                await self._sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                continue
            connected_at = time.monotonic()
            try:
                connection.close_callbacks.add(lambda *_: self._lost.set())
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
                await asyncio.to_thread(self._adopt_orphans)
                with self._changed:
                    self._connected, self._refused = True, None
                    self._changed.notify_all()
                log.info("publisher connected", url=redact(url))
                unreachable_logged = False
                self._wakeup.set()
                await self._lost.wait()
            except Exception as exc:
                log.warning("publisher channel failed", error=f"{type(exc).__name__}: {exc}"[:300])
            finally:
                self._exchange = None
                with self._changed:
                    self._connected = False
                    self._changed.notify_all()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), self.settings.publish_confirm_timeout_s)
            if self._stopping.is_set():
                break
            self._set_spooling()
            self._wakeup.set()
            if time.monotonic() - connected_at > HEALTHY_CONNECTION_S:
                delay = RECONNECT_MIN_S
            await self._sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)
