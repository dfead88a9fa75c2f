"""Publishing accepted events to ml.events and awaiting the broker's confirms, or saying it cannot.

One connection and one confirming channel, shared by all requests. When the broker is away the gateway does not
queue anything: the request fails with BrokerUnavailable (the HTTP layer answers 503 and the client retries with
the same event ids), so nothing is acknowledged that the broker has not confirmed. Reconnection is lazy: the next
request (or /healthz) tries again, at most once per `retry_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import aio_pika
import aiormq

from schemas import EXCHANGE, Event

RETRY_S = 0.5


class BrokerUnavailable(Exception):
    """The broker is unreachable, refused a publish, or did not confirm in time: nothing is acknowledged."""


def message_for(event: Event) -> aio_pika.Message:
    """The AMQP message of an event: body and properties as producer/publisher.py publishes them."""
    return aio_pika.Message(
        event.to_json(), message_id=str(event.event_id), type=event.event_type, content_type="application/json",
        timestamp=event.occurred_at, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _confirmed(exchange: aio_pika.abc.AbstractExchange, event: Event) -> BaseException | None:
    """Publish one event and await its confirm: None when confirmed, else why not."""
    try:
        await exchange.publish(message_for(event), routing_key=event.event_type, mandatory=True)
    except asyncio.CancelledError as exc:
        if asyncio.current_task().cancelling():  # this request is cancelled (its deadline, shutdown): stop here
            raise
        return exc  # the library cancelled the confirm (its channel closed): a failure like any other
    except Exception as exc:  # noqa: BLE001 - every failure is reported per event, the caller decides
        return exc
    return None


class ConfirmingPublisher:
    def __init__(self, amqp_url: str, confirm_timeout_s: float, name: str = "sntrack-gateway"):
        self._url = amqp_url
        self._timeout = confirm_timeout_s
        self._name = name
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._lock = asyncio.Lock()
        self._failed_at = -RETRY_S
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._exchange is not None

    async def publish(self, events: list[Event]) -> None:
        """Publish every event (mandatory, persistent) and return once the broker confirmed them all."""
        exchange = await self._ensure()
        try:
            async with asyncio.timeout(self._timeout):  # one deadline for the whole batch, not a timer per message
                if len(events) == 1:  # one event a request, the common case: no task, its frames written right away
                    results = [await _confirmed(exchange, events[0])]
                else:
                    results = await asyncio.gather(*(_confirmed(exchange, e) for e in events))
        except TimeoutError:
            await self._drop(None)
            raise BrokerUnavailable(f"no confirm for {len(events)} events within {self._timeout} s") from None
        failures = [r for r in results if r is not None]
        if failures:
            first = failures[0]
            if not isinstance(first, aiormq.exceptions.PublishError):  # a return is topology, not the line
                await self._drop(first)
            raise BrokerUnavailable(f"{len(failures)} of {len(events)} events not confirmed: "
                                    f"{type(first).__name__}: {first}"[:300])

    async def check(self) -> bool:
        """Connected now, trying to connect if not (at most once per RETRY_S)."""
        with contextlib.suppress(BrokerUnavailable):
            await self._ensure()
        return self.connected

    async def close(self) -> None:
        await self._drop(None)

    async def _ensure(self) -> aio_pika.abc.AbstractExchange:
        if (exchange := self._exchange) is not None:
            return exchange
        async with self._lock:
            if self._exchange is not None:
                return self._exchange
            if time.monotonic() - self._failed_at < RETRY_S:
                raise BrokerUnavailable(f"broker unreachable: {self.last_error}")
            try:
                connection = await aio_pika.connect(self._url, timeout=self._timeout,
                                                    client_properties={"connection_name": self._name})
            except Exception as exc:  # noqa: BLE001 - any failure to connect is "unavailable, retry later"
                raise self._failure("broker unreachable", exc) from None
            try:
                channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            except Exception as exc:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    await connection.close()
                raise self._failure("broker channel failed", exc) from None
            connection.close_callbacks.add(self._lost)
            self._connection, self._exchange, self.last_error = connection, exchange, None
            return exchange

    def _failure(self, what: str, exc: Exception) -> BrokerUnavailable:
        self._failed_at = time.monotonic()
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        return BrokerUnavailable(f"{what}: {self.last_error}")

    def _lost(self, connection: object, *_: object) -> None:
        if connection is self._connection:
            self._connection = self._exchange = None

    async def _drop(self, error: BaseException | None) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"[:300]
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), self._timeout)
