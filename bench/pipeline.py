"""Pipeline benchmark: end-to-end latency and sustained throughput of journal+trials, and replay speed.

Baseline, measured in the same run on the same broker: raw aio-pika publish → consume (ack) of the same
message bodies through a plain quorum queue on an exchange of its own, no validation, no database.

Pipeline latency is publish → `trials` row committed, observed with LISTEN/NOTIFY: a trigger on
`applied_events` (written in the same transaction as the trials rows) notifies the event id, and PostgreSQL
delivers notifications at commit. The consumers run as two daemons, `sntrack consume journal` and
`sntrack consume trials`, as they would be deployed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import aio_pika
import asyncpg

from bench.timing import percentiles
from consumers.broker_admin import ManagementApi
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE
from sntrack.settings import Settings
from tests.sandbox import sandbox

RAW_EXCHANGE = "sntrack.bench-raw"
NOTIFY_TRIGGER = """
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench', NEW.event_id::text); RETURN NEW; END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON applied_events FOR EACH ROW
    WHEN (NEW.projection = 'trials') EXECUTE FUNCTION bench_notify();
"""

Message = tuple[str, bytes, str]  # (event id, body, routing key)


def _messages(events: int, seed: int) -> list[Message]:
    study = synthetic_study(max(1, events // 22), 20, seed=seed, producer=producer_info("bench"))
    return [(str(e.event_id), e.to_json(), e.event_type) for trial in study for e in trial]


async def _publish(exchange, messages: list[Message], rate: float | None, sent_at: dict[str, float]) -> None:
    """Publish with confirms, paced at `rate` events/s (None: as fast as confirms allow, 1000 in flight)."""
    started = time.perf_counter()
    in_flight: list[asyncio.Future] = []
    for i, (event_id, body, routing_key) in enumerate(messages):
        if rate is not None and (delay := started + i / rate - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        sent_at[event_id] = time.perf_counter()
        message = aio_pika.Message(body, message_id=event_id, content_type="application/json",
                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        in_flight.append(asyncio.ensure_future(exchange.publish(message, routing_key=routing_key)))
        if len(in_flight) >= 1000:
            await asyncio.gather(*in_flight)
            in_flight.clear()
    await asyncio.gather(*in_flight)


class _Arrivals:
    """Records when each expected event id arrives; `done` is set when all have."""

    def __init__(self, messages: list[Message]):
        self.wanted = {event_id for event_id, _, _ in messages}
        self.sent_at: dict[str, float] = {}
        self.latencies_ms: list[float] = []
        self.done = asyncio.Event()

    def arrived(self, event_id: str) -> None:
        if event_id in self.wanted:
            self.wanted.discard(event_id)
            self.latencies_ms.append((time.perf_counter() - self.sent_at[event_id]) * 1000)
            if not self.wanted:
                self.done.set()


async def _measure(settings: Settings, messages: list[Message], rate: float | None, exchange_name: str,
                   listen: Callable) -> tuple[list[float], float]:
    """Publish `messages` to `exchange_name`; `listen(arrivals)` wires up arrival detection and returns a
    closer. Returns per-event latencies and events/s over the whole run."""
    arrivals = _Arrivals(messages)
    close = await listen(arrivals)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        started = time.perf_counter()
        await _publish(exchange, messages, rate, arrivals.sent_at)
        await asyncio.wait_for(arrivals.done.wait(), timeout=300)
        return arrivals.latencies_ms, len(messages) / (time.perf_counter() - started)
    finally:
        await connection.close()
        await close()


def raw_listener(settings: Settings):
    async def listen(arrivals: _Arrivals):
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue("sntrack.bench-raw", ensure=False)

        async def on_message(message):
            await message.ack()
            arrivals.arrived(message.message_id)

        await queue.consume(on_message)
        return connection.close

    return listen


def pipeline_listener(settings: Settings):
    async def listen(arrivals: _Arrivals):
        listener = await asyncpg.connect(settings.database_url)
        await listener.add_listener("bench", lambda _c, _p, _ch, event_id: arrivals.arrived(event_id))
        return listener.close

    return listen


async def _declare_raw(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(RAW_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("sntrack.bench-raw", durable=True, arguments={"x-queue-type": "quorum"})
        await queue.bind(exchange, routing_key="ml.run.#")
    finally:
        await connection.close()


def _start_consumers(settings: Settings) -> list[subprocess.Popen]:
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    return [subprocess.Popen([sys.executable, "-m", "sntrack", "consume", name], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in ("journal", "trials")]


async def _wait_for_consumers(settings: Settings) -> None:
    api = ManagementApi(settings.rabbitmq_admin_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        infos = [await asyncio.to_thread(api.request, "GET", f"queues/{settings.amqp_vhost}/{queue}")
                 for queue in ("sntrack.journal", "sntrack.trials")]
        if all(info and info.get("consumers") for info in infos):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("consumers did not attach within 60 s")


async def run(base: Settings, *, duration_s: float = 8.0, throughput_events: int = 20_000, log=print) -> dict:
    results: dict = {"latency": {}}
    async with sandbox(base, prefix="sntrack-bench") as settings:
        conn = await asyncpg.connect(settings.database_url)
        await conn.execute(NOTIFY_TRIGGER)
        await conn.close()
        await _declare_raw(settings)
        raw, pipe = raw_listener(settings), pipeline_listener(settings)
        daemons = _start_consumers(settings)
        try:
            await _wait_for_consumers(settings)
            await _measure(settings, _messages(500, seed=99), None, EXCHANGE, pipe)  # warm-up
            for seed, rate in enumerate((250, 500), start=1):
                messages = _messages(int(rate * duration_s), seed)
                log(f"latency at {rate} events/s: {len(messages)} events each, raw baseline then sntrack")
                raw_ms, _ = await _measure(settings, messages, rate, RAW_EXCHANGE, raw)
                pipe_ms, _ = await _measure(settings, _messages(int(rate * duration_s), seed + 10), rate, EXCHANGE,
                                            pipe)
                row = {"raw_ms": percentiles(raw_ms), "pipeline_ms": percentiles(pipe_ms)}
                row["p95_ratio"] = round(row["pipeline_ms"]["p95"] / row["raw_ms"]["p95"], 2)
                results["latency"][str(rate)] = row
                log(f"  raw {row['raw_ms']}\n  sntrack {row['pipeline_ms']}")
            log(f"throughput: {throughput_events} events published as fast as confirms allow")
            _, raw_rate = await _measure(settings, _messages(throughput_events, 42), None, RAW_EXCHANGE, raw)
            _, pipe_rate = await _measure(settings, _messages(throughput_events, 43), None, EXCHANGE, pipe)
            results["throughput"] = {"events": throughput_events, "raw_events_per_s": round(raw_rate),
                                     "pipeline_events_per_s": round(pipe_rate), "ratio": round(pipe_rate / raw_rate, 2)}
            log(f"  raw {raw_rate:,.0f}/s  journal+trials {pipe_rate:,.0f}/s")
        finally:
            for daemon in daemons:
                daemon.send_signal(signal.SIGTERM)
            for daemon in daemons:
                daemon.wait(timeout=30)
        pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=2)
        try:
            replayed = await replay(pool, PROJECTIONS["trials"])
        finally:
            await pool.close()
        results["replay"] = {"events": replayed.events, "seconds": round(replayed.seconds, 2),
                             "events_per_s": round(replayed.events_per_s)}
        log(f"replay trials: {replayed.events} events at {replayed.events_per_s:,.0f}/s")
    return results


if __name__ == "__main__":
    print(asyncio.run(run(Settings.from_env())))
