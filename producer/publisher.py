"""EventPublisher: confirmed, persistent publishing for synchronous training code, spooling when the broker is away.

    with EventPublisher(settings.publisher()) as publisher:   # start(); close() on exit
        publisher.publish(event)                  # never blocks on the network, never raises for the broker

Inside, a daemon thread runs an asyncio loop with two tasks. The connection task keeps one AMQP connection
(its own reconnect loop with backoff) and a channel with publisher confirms. The dispatcher moves events out
of the bounded in-memory buffer:

- direct mode (connected, spool empty): publish in batches (mandatory, persistent) and await the confirms; a
  failure of any kind (connection loss, confirm timeout, nack) spools what was not confirmed and switches to
  spool mode;
- spool mode: the buffer is written to the spool (producer/spool.py), and, while connected, the spool is
  drained in order; once it is empty, back to direct mode. New events therefore always queue behind older
  spooled ones, which keeps each trial's events in order.

The thread wakes in batches, not per event: publish() wakes it for the first event in an empty buffer and again
once WAKE_EVENTS wait; the thread then lets the buffer fill for LINGER_S (no longer when flush(), drain() or
close() waits, or WAKE_EVENTS wait) and sends it as one batch. An idle publisher does not wake at all. A training
loop that publishes one event per epoch would otherwise pay, per event, a loop wake-up, a socket write and a
confirm read on a thread that takes the GIL from it (the thread's CPU per event: `PublisherStats.thread_cpu_s`;
bench/training_overhead.py). The cost is latency: an event leaves at most LINGER_S after publish(), and its
durability (confirmed or spooled) waits that much longer unless someone flushes.

When the buffer is full, publish() writes to the spool itself (with whatever is buffered or in flight ahead
of it, so order holds), still without touching the network. Every event is confirmed, spooled, or (while the
publisher runs) on its way to one of the two; close() spools anything still in memory, also when a second
Ctrl-C interrupts its wait
(tests/test_worker_kills.py::test_second_ctrl_c_during_shutdown_still_spools_what_is_in_memory).

When the disk refuses too (full, read-only) the buffer is the only place left, and it stays bounded: publish()
raises SpoolFull once `PublisherConfig.buffer` events wait in memory, refusing the event rather than dropping it
silently; what was accepted goes to the broker as soon as it is back, full disk or not
(tests/test_publisher_limits.py::test_full_disk_and_no_broker_bound_the_buffer_then_the_broker_takes_it).

An event the broker returns as unroutable (no binding, no alternate exchange) is quarantined, with the reason,
in `<spool_dir>/rejected/` and counted in `PublisherStats.rejected`; it never holds back the events behind it
(tests/test_publisher_limits.py::test_unroutable_events_are_quarantined_and_never_block_the_spool).
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
import aiormq
import structlog

from common.amqp import amqp_refusal
from common.urls import redact
from producer.config import PublisherConfig
from producer.emitter import producer_info
from producer.spool import REJECTED_DIR, Record, Spool
from schemas import EXCHANGE, Event

log = structlog.get_logger("sntrack.publisher")

BATCH = 500  # events published concurrently before awaiting their confirms
LINGER_S = 0.25  # the longest an event waits in the buffer before the thread looks (when nobody flushes)
WAKE_EVENTS = 64  # this many events waiting wake the thread at once
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 5.0
FIRST_CONTACT_S = 5.0  # how long to wait to tell a refusing broker (configuration) from an absent one
HEALTHY_CONNECTION_S = 10.0  # a connection that lived this long resets the reconnect backoff
DISK_RETRY_S = 1.0  # after the disk refused the spool, the dispatcher tries it again this much later


@dataclass(frozen=True)
class PublisherStats:
    published: int  # publish() calls
    confirmed: int  # confirmed by the broker when first sent
    spooled: int  # written durably to the spool instead
    flushed_from_spool: int  # drained from the spool (adopted orphans included) and confirmed
    pending: int  # published but neither confirmed nor spooled yet
    rejected: int  # returned by the broker as unroutable, quarantined in <spool_dir>/rejected/
    connected: bool
    refused: str | None  # the broker answered but refused us (credentials, vhost): configuration, not an outage
    thread_cpu_s: float = 0.0  # CPU time the publishing thread had used when it last went to rest


class SpoolFull(RuntimeError):
    """The broker is away, the disk refuses the spool, and the in-memory buffer is full: the event was refused."""


class EventPublisher:
    def __init__(self, config: PublisherConfig):
        self.config = config
        self._spool = Spool(config.spool_dir)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # counters, _spooling and _connected
        # Held by everything that appends to the spool, taken before _lock: spool order = publish order.
        self._order_lock = threading.Lock()
        self._buffer: deque[Record] = deque()
        self._inflight: list[Record] | None = None  # the direct batch awaiting confirms
        self._inflight_taken = False  # an overflow or a shutdown took it over (spooled or back in the buffer)
        self._spooling = False
        self._connected = False
        self._refused: str | None = None
        self._attempts = 0  # failed connection attempts
        self._published = self._confirmed = self._spooled = self._from_spool = 0
        self._rejected = 0
        self._rejected_direct = 0  # settled by quarantine before reaching the spool
        self._disk_retry_at = 0.0  # after a failed spool write the dispatcher rests before the next one
        self._waiting = 0  # callers waiting in flush() or drain(): the thread does not linger for them
        self._thread_cpu_s = 0.0  # the publishing thread's time.thread_time(), as of its last rest
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
        """Hand an event over; it is confirmed by the broker or spooled durably in the background. Raises
        SpoolFull, refusing the event, only when the buffer is full and the disk refuses the spool too."""
        record = Record.from_event(event)
        with self._lock:
            if self._state == "closed":
                raise RuntimeError("publish() on a closed EventPublisher")
            if len(self._buffer) < self.config.buffer:
                self._published += 1
                self._buffer.append(record)
                if len(self._buffer) in (1, WAKE_EVENTS):
                    self._wake()
                return
        self._overflow(record)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published so far is confirmed or spooled; False if `timeout` ran out first."""
        return self._wait_for(lambda: self._pending() == 0, timeout)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything is confirmed by the broker, the spool (adopted orphans included) emptied too."""
        return self._wait_for(lambda: self._pending() == 0 and not self._spooling, timeout)

    def _wait_for(self, done, timeout: float | None) -> bool:
        """Wait for `done` with the thread told to send what is buffered now rather than after LINGER_S."""
        with self._changed:
            if done():
                return True
            self._waiting += 1
        try:
            self._wake()
            with self._changed:
                return self._changed.wait_for(done, timeout)
        finally:
            with self._lock:
                self._waiting -= 1

    def close(self, timeout: float | None = 30.0, *, interrupted: bool = False) -> bool:
        """Flush (and, while connected, drain the spool) within `timeout`, then stop the thread; anything
        still in memory is spooled. `interrupted` (or a KeyboardInterrupt during the wait) skips the waiting
        and spools memory at once. True when every published event is confirmed or spooled."""
        with self._lock:
            previous, self._state = self._state, "closed"
        if previous == "closed":
            return self.stats.pending == 0
        deadline = None if timeout is None else time.monotonic() + timeout
        waited = False
        try:
            if previous == "running" and not interrupted:
                self.flush(timeout)
                if self.stats.connected:
                    self.drain(None if deadline is None else max(0.0, deadline - time.monotonic()))
                waited = True
        finally:  # also after a second Ctrl-C during the wait: what is in memory goes to the disk now
            if not waited:
                self._spill_all()
            if previous == "running":
                self._loop.call_soon_threadsafe(self._request_stop)
                self._thread.join(None if waited else self.config.confirm_timeout_s)
                atexit.unregister(self.close)
            self._spill_all()
            if pending := self.stats.pending:
                log.error("events could not be spooled and are lost", events=pending,
                          spool_dir=str(self.config.spool_dir))
            if not self._spool.is_empty():
                log.info("events remain spooled; the next publisher on this spool dir delivers them",
                         spool_dir=str(self.config.spool_dir))
            self._spool.close()
        return self.stats.pending == 0

    @property
    def stats(self) -> PublisherStats:
        with self._lock:
            return PublisherStats(self._published, self._confirmed, self._spooled, self._from_spool,
                                  self._pending(), self._rejected, self._connected, self._refused,
                                  self._thread_cpu_s)

    def first_contact(self, timeout: float = FIRST_CONTACT_S) -> str | None:
        """Wait up to `timeout` for the first connection attempt to be decided. Returns why the broker refused
        us (wrong credentials, unknown vhost), or None: connected, or merely unreachable (events spool)."""
        with self._changed:
            self._changed.wait_for(lambda: self._connected or self._refused or self._attempts > 0, timeout)
            return self._refused

    def __enter__(self) -> EventPublisher:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))

    # -- shared between the caller's thread and the publishing thread -----------------------------------------

    def _pending(self) -> int:
        return self._published - self._confirmed - self._spooled - self._rejected_direct

    def _wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def _overflow(self, record: Record) -> None:
        """Buffer full: spool now, behind what is in flight and buffered; SpoolFull when the disk refuses."""
        with self._order_lock:
            with self._lock:
                held = self._take_memory()
                self._published += 1
            spooled = self._write_spool([*held, record], requeue=held)
            if not spooled:
                with self._lock:
                    self._published -= 1
        self._wake()
        if not spooled:
            raise SpoolFull(f"event refused: the broker is unreachable, the spool at {self.config.spool_dir} "
                            f"cannot be written, and {len(held)} events already wait in memory")

    def _take_memory(self) -> list[Record]:
        """Everything unsettled in memory, in order: the batch in flight (unless already taken) and the buffer.
        Hold _order_lock and _lock."""
        records = []
        if self._inflight is not None and not self._inflight_taken:
            records.extend(self._inflight)
            self._inflight_taken = True
        records.extend(self._buffer)
        self._buffer.clear()
        self._spooling = True
        return records

    def _spill_all(self) -> bool:
        with self._order_lock:
            with self._lock:
                records = self._take_memory()
            return self._write_spool(records) if records else True

    def _write_spool(self, records: list[Record], requeue: list[Record] | None = None) -> bool:
        """Append to the spool; hold _order_lock. On a disk error `requeue` (default: all the records) goes back
        to the buffer's head."""
        try:
            self._spool.append(records)
        except OSError as exc:
            log.error("cannot write the spool; keeping events in memory", spool_dir=str(self.config.spool_dir),
                      error=str(exc))
            with self._lock:
                self._buffer.extendleft(reversed(records if requeue is None else requeue))
                self._disk_retry_at = time.monotonic() + DISK_RETRY_S
            return False
        with self._changed:
            self._spooled += len(records)
            self._changed.notify_all()
        return True

    def _spill(self) -> bool:
        with self._order_lock:
            with self._lock:
                records = list(self._buffer)
                self._buffer.clear()
            return self._write_spool(records) if records else True

    def _adopt_orphans(self) -> None:
        with self._order_lock:
            self._spool.adopt_orphans()
            if not self._spool.is_empty():
                self._set_spooling()

    def _set_spooling(self) -> None:
        with self._changed:
            self._spooling = True
            self._changed.notify_all()

    def _settle_direct(self, batch: list[Record], failed: list[Record], rejected: int) -> None:
        with self._order_lock:
            with self._lock:
                self._inflight = None
                if self._inflight_taken:
                    return  # counted when taken over; any confirmed ones are duplicates later
            if failed:
                self._set_spooling()
                self._write_spool(failed)
            with self._changed:
                self._confirmed += len(batch) - len(failed) - rejected
                self._rejected += rejected
                self._rejected_direct += rejected
                self._changed.notify_all()

    def _quarantine(self, returned: list[tuple[Record, str]]) -> bool:
        try:
            self._spool.reject(returned)
        except OSError as exc:
            log.error("cannot quarantine unroutable events; retrying them", error=str(exc))
            return False
        for record, reason in returned:
            log.error("the broker returned an event as unroutable; quarantined",
                      event_id=record.event_id, event_type=record.event_type, reason=reason,
                      quarantine=str(self.config.spool_dir / REJECTED_DIR))
        return True

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
            self._thread_cpu_s = time.thread_time()

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
        due = False  # the buffer lingered LINGER_S: send it
        while not self._stopping.is_set():
            self._wakeup.clear()
            with self._lock:
                spooling, buffered = self._spooling, bool(self._buffer)
                due = due or self._waiting > 0 or len(self._buffer) >= WAKE_EVENTS
            exchange = self._exchange
            disk_rests = time.monotonic() < self._disk_retry_at
            try:
                if spooling and buffered and not disk_rests:
                    await asyncio.to_thread(self._spill)
                    continue
                # The disk refusing the buffer does not stop the broker from taking the spool, then the buffer.
                if exchange is not None and spooling:
                    await self._drain_chunk(exchange)
                    continue
                if exchange is not None and buffered and due:
                    await self._send_direct(exchange)
                    due = False
                    continue
                if spooling and buffered:
                    await self._sleep(self._disk_retry_at - time.monotonic(), wake=True)
                    continue
            except Exception as exc:  # any failure to get a confirm: spool, then reconnect
                log.warning("publish failed; spooling until the broker confirms again",
                            error=f"{type(exc).__name__}: {exc}"[:300])
                self._set_spooling()
                self._lost.set()
                continue
            due = await self._rest(LINGER_S if buffered else None)
        await asyncio.to_thread(self._spill_all)

    async def _rest(self, seconds: float | None) -> bool:
        """Wait for a wake-up, at most `seconds` (None: no limit); True when the time ran out."""
        self._thread_cpu_s = time.thread_time()
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            return True
        return False

    async def _publish(self, exchange: aio_pika.abc.AbstractExchange, record: Record) -> str | None:
        """Publish and await the confirm; the broker's reason when it returned the event as unroutable."""
        message = aio_pika.Message(
            record.body, message_id=record.event_id, type=record.event_type, content_type="application/json",
            timestamp=record.occurred_at, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await exchange.publish(message, routing_key=record.event_type, mandatory=True,
                                   timeout=self.config.confirm_timeout_s)
        except aiormq.exceptions.PublishError as returned:
            frame = returned.message.delivery
            return f"{frame.reply_code} {frame.reply_text}"
        return None

    async def _publish_all(self, exchange: aio_pika.abc.AbstractExchange,
                           records: list[Record]) -> tuple[list, set[int]]:
        """Publish concurrently: each one's result (None, a return reason or an exception), and the indexes of
        the returned ones, now quarantined."""
        results = await asyncio.gather(*(self._publish(exchange, r) for r in records), return_exceptions=True)
        returned = [(i, record, result) for i, (record, result) in enumerate(zip(records, results, strict=True))
                    if isinstance(result, str)]
        if returned and await asyncio.to_thread(self._quarantine, [(r, reason) for _, r, reason in returned]):
            return results, {i for i, _, _ in returned}
        return results, set()

    async def _send_direct(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        with self._lock:
            batch = [self._buffer.popleft() for _ in range(min(BATCH, len(self._buffer)))]
            self._inflight, self._inflight_taken = batch, False
        results, quarantined = await self._publish_all(exchange, batch)
        failed = [record for i, (record, result) in enumerate(zip(batch, results, strict=True))
                  if result is not None and i not in quarantined]
        await asyncio.to_thread(self._settle_direct, batch, failed, len(quarantined))
        _raise_first(results)

    async def _drain_chunk(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        chunk = await asyncio.to_thread(self._spool.next_chunk, BATCH)
        if chunk is None:
            await asyncio.to_thread(self._leave_spooling)
            return
        results, quarantined = await self._publish_all(exchange, chunk.records)
        _raise_first(results)
        if len(quarantined) < sum(result is not None for result in results):
            raise OSError("unroutable events could not be quarantined")
        await asyncio.to_thread(self._spool.commit, chunk)
        with self._changed:
            self._from_spool += len(chunk.records) - len(quarantined)
            self._rejected += len(quarantined)
            self._changed.notify_all()

    async def _sleep(self, seconds: float, wake: bool = False) -> None:
        """Sleep up to `seconds`, less when stopping (or, with `wake`, when woken)."""
        waits = [asyncio.ensure_future(self._stopping.wait())]
        if wake:
            waits.append(asyncio.ensure_future(self._wakeup.wait()))
        try:
            await asyncio.wait(waits, timeout=max(0.0, seconds), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def _maintain_connection(self) -> None:
        url = self.config.amqp_url
        name = f"sntrack-publisher-{self.config.worker_id or producer_info().worker_id}"
        delay = RECONNECT_MIN_S
        unreachable_logged = False
        while not self._stopping.is_set():
            self._lost.clear()
            try:
                connection = await aio_pika.connect(url, timeout=self.config.confirm_timeout_s,
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
                                error=f"{type(exc).__name__}: {exc}"[:300], spool_dir=str(self.config.spool_dir))
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
                    await asyncio.wait_for(connection.close(), self.config.confirm_timeout_s)
            if self._stopping.is_set():
                break
            self._set_spooling()
            self._wakeup.set()
            if time.monotonic() - connected_at > HEALTHY_CONNECTION_S:
                delay = RECONNECT_MIN_S
            await self._sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)


def _raise_first(results: list) -> None:
    for result in results:
        if isinstance(result, BaseException):
            raise result
