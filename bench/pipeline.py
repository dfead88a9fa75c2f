"""Pipeline benchmark: end-to-end latency and where it goes, sustained throughput, and replay speed.

Baseline, measured in the same run on the same broker: raw aio-pika publish → consume (ack) of the same kind of
message bodies through a plain quorum queue on an exchange of its own, no validation, no database. Latency is
measured in alternating turns (raw, then sntrack, then raw…), so both see the same load from whatever else the
machine runs.

The durable floor, measured in the same turns and the same way as sntrack (its own sandbox, a daemon, a NOTIFY at
commit): bench/floor.py, a consumer that writes each batch of what has arrived in one INSERT, its own transaction,
then acks it. One round trip and one durable commit per batch: what any consumer that keeps what it acks pays.

Pipeline latency is publish → `trials` row committed, observed with LISTEN/NOTIFY: a trigger on `applied_events`
(written in the same transaction as the trials rows) notifies the projection and event id (the journal, which keeps no
applied_events rows, by a trigger on its own rows), and PostgreSQL delivers notifications at commit. The consumers run
as `sntrack consume` daemons in two layouts, each in its own sandbox and measured in the same turns: one daemon per
consumer (as the systemd units deploy them) and one daemon for all (fewer processes on the CPUs). Journal and trials
for latency; journal, trials and comparison for throughput. The trials daemon of the first layout writes its batches'
stage timestamps (SNTRACK_STAGE_LOG, consumers/stages.py), from which each event's latency is split into its stages.
The one daemon for all is profiled with py-spy (bench/profile.py) in a throughput pass of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aio_pika
import asyncpg

from bench import floor
from bench.profile import sampled
from bench.timing import percentiles
from consumers.broker_admin import ManagementApi
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE
from schemas.topology import RUN_STOP
from sntrack.settings import Settings
from tests.sandbox import sandbox

RAW_EXCHANGE = "sntrack.bench-raw"
LATENCY_CONSUMERS = ("journal", "trials")
THROUGHPUT_CONSUMERS = ("journal", "trials", "comparison")
DAEMONS, ONE_PROCESS = "one daemon per consumer", "one daemon for all"  # the layouts measured side by side
FLOOR = "the durable floor"
MEASURED = "trials"  # latency is publish → this projection's commit (the raw baseline's consume stands for it)
NOTIFY_TRIGGER = """
CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench', NEW.projection || ' ' || NEW.event_id::text); RETURN NEW; END $$;
CREATE TRIGGER bench_notify AFTER INSERT ON applied_events FOR EACH ROW EXECUTE FUNCTION bench_notify();
CREATE FUNCTION bench_notify_journal() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('bench', 'journal ' || NEW.event_id::text); RETURN NEW; END $$;
CREATE TRIGGER bench_notify_journal AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION bench_notify_journal();
"""  # the journal keeps no applied_events rows: its own rows tell when it applied an event
# (label, stage stamp that ends it) in path order; each stage runs from the previous stamp to its own.
STAGES = (
    ("broker: publish → delivered to the consumer", "arrived"),
    ("waiting for the batch in hand to finish", "taken"),
    ("gate: parse and validate", "gated"),
    ("pool acquire + BEGIN", "begun"),
    ("bookkeeping: record in applied_events, NOTIFY", "recorded"),
    ("projection statements", "projected"),
    ("COMMIT (WAL flush)", "committed"),
    ("commit → NOTIFY heard by the bench", "heard"),
)

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
    """Which (projection, event id) pairs are still awaited, and when MEASURED's arrived; `done` is set when none
    is awaited."""

    def __init__(self):
        self.sent_at: dict[str, float] = {}
        self.heard_at: dict[str, float] = {}
        self.awaited: set[tuple[str, str]] = set()
        self.done = asyncio.Event()

    def expect(self, messages: list[Message], projections: tuple[str, ...]) -> None:
        self.awaited.update((projection, event_id) for event_id, _, routing_key in messages
                            for projection in projections if projection != "comparison" or routing_key == RUN_STOP)
        self.done.clear()

    def arrived(self, projection: str, event_id: str) -> None:
        if (projection, event_id) in self.awaited:
            self.awaited.discard((projection, event_id))
            if projection == MEASURED:
                self.heard_at[event_id] = time.perf_counter()
            if not self.awaited:
                self.done.set()

    def latencies_ms(self, messages: list[Message]) -> list[float]:
        return [(self.heard_at[i] - self.sent_at[i]) * 1000 for i, _, _ in messages if i in self.heard_at]


async def _measure(settings: Settings, messages: list[Message], rate: float | None, exchange_name: str,
                   listen: Callable, projections: tuple[str, ...] = (MEASURED,)) -> tuple[list[float], float]:
    """Publish `messages` to `exchange_name`; `listen(arrivals)` wires up arrival detection and returns a
    closer. Returns per-event latencies and events/s until every one of `projections` had them all."""
    arrivals = _Arrivals()
    arrivals.expect(messages, projections)
    close = await listen(arrivals)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(exchange_name, ensure=False)
        started = time.perf_counter()
        await _publish(exchange, messages, rate, arrivals.sent_at)
        await asyncio.wait_for(arrivals.done.wait(), timeout=300)
        return arrivals.latencies_ms(messages), len(messages) / (time.perf_counter() - started)
    finally:
        await connection.close()
        await close()


Arm = tuple[list[Message], Settings, str, Callable]  # messages, the sandbox, the exchange, the listener


async def _measure_in_turns(arms: dict[str, Arm], rate: float, turn: int) -> dict[str, _Arrivals]:
    """Latency of each arm, published at `rate` in alternating turns of `turn` events; each turn ends when all its
    events arrived."""
    arrivals = {name: _Arrivals() for name in arms}
    closers, exchanges = [], {}
    try:
        for name, (_, settings, exchange, listen) in arms.items():
            closers.append(await listen(arrivals[name]))
            connection = await aio_pika.connect(settings.amqp_url)
            closers.append(connection.close)
            channel = await connection.channel(publisher_confirms=True)
            exchanges[name] = await channel.get_exchange(exchange, ensure=False)
        for start in range(0, max(len(arm[0]) for arm in arms.values()), turn):
            for name, (messages, *_) in arms.items():
                part = messages[start:start + turn]
                if part:
                    arrivals[name].expect(part, (MEASURED,))
                    await _publish(exchanges[name], part, rate, arrivals[name].sent_at)
                    await asyncio.wait_for(arrivals[name].done.wait(), timeout=120)
        return arrivals
    finally:
        for close in closers:
            await close()


def raw_listener(settings: Settings):
    async def listen(arrivals: _Arrivals):
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        queue = await channel.get_queue("sntrack.bench-raw", ensure=False)

        async def on_message(message):
            await message.ack()
            arrivals.arrived(MEASURED, message.message_id)

        await queue.consume(on_message)
        return connection.close

    return listen


def pipeline_listener(settings: Settings):
    async def listen(arrivals: _Arrivals):
        listener = await asyncpg.connect(settings.database_url)
        await listener.add_listener("bench", lambda _c, _p, _ch, payload: arrivals.arrived(*payload.split(" ")))
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


def _start_consumers(settings: Settings, names: tuple[str, ...] = LATENCY_CONSUMERS, stage_log: Path | None = None,
                     together: bool = False) -> list[subprocess.Popen]:
    """One `sntrack consume NAME` daemon per name, or one `sntrack consume NAME…` for all when `together`."""
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    if stage_log is not None:
        env["SNTRACK_STAGE_LOG"] = str(stage_log)
    groups = [names] if together else [(name,) for name in names]
    return [subprocess.Popen([sys.executable, "-m", "sntrack", "consume", *group], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for group in groups]


def _route(layout: str) -> tuple[str, str]:
    """The queue name prefix and the exchange of a layout's consumers."""
    return (floor.QUEUE_PREFIX, floor.EXCHANGE) if layout == FLOOR else ("sntrack.", EXCHANGE)


def _start_floor(settings: Settings, names: tuple[str, ...]) -> list[subprocess.Popen]:
    """bench/floor.py consuming `names`' queues, one daemon for all."""
    return [subprocess.Popen([sys.executable, "-m", "bench.floor", *names], env={**os.environ, **settings.to_env()},
                             stdout=subprocess.DEVNULL)]


def _stop(daemons: list[subprocess.Popen]) -> None:
    for daemon in daemons:
        daemon.send_signal(signal.SIGTERM)
    for daemon in daemons:
        daemon.wait(timeout=30)


async def _wait_for_consumers(settings: Settings, names: tuple[str, ...] = LATENCY_CONSUMERS,
                              prefix: str = "sntrack.") -> None:
    api = ManagementApi(settings.rabbitmq_admin_url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        infos = [await asyncio.to_thread(api.request, "GET", f"queues/{settings.amqp_vhost}/{prefix}{name}")
                 for name in names]
        if all(info and info.get("consumers") for info in infos):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("consumers did not attach within 60 s")


def _cpu_s(daemons: list[subprocess.Popen]) -> float:
    """User + system CPU seconds the daemons have used so far."""
    ticks = 0
    for daemon in daemons:
        fields = Path(f"/proc/{daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _breakdown(stage_log: Path, arrivals: _Arrivals, event_ids: set[str]) -> dict:
    """Per stage (STAGES), the ms each of `event_ids` spent in it: mean (the means add up to the mean latency)
    and percentiles. From the MEASURED consumer's stage log, the publish and the NOTIFY heard."""
    spans: dict[str, list[float]] = {label: [] for label, _ in STAGES}
    batch_sizes = []
    for line in (stage_log / f"{MEASURED}.jsonl").read_text().splitlines():
        batch = json.loads(line)
        ids = [(event_id, arrived) for event_id, arrived in batch["events"] if event_id in event_ids]
        if not ids:
            continue
        batch_sizes.append(len(batch["events"]))
        marks = dict(reversed(batch["marks"]))  # the first stamp of each stage: a retried batch stamps again
        for event_id, arrived in ids:
            if event_id not in arrivals.heard_at:
                continue
            stamps = {**marks, "arrived": arrived, "heard": arrivals.heard_at[event_id]}
            previous = arrivals.sent_at[event_id]
            for label, stage in STAGES:
                spans[label].append((stamps[stage] - previous) * 1000)
                previous = stamps[stage]
    return {"stages": {label: {"mean": round(statistics.fmean(ms), 3), **percentiles(ms)}
                       for label, ms in spans.items()},
            "batch_size": {"mean": round(statistics.fmean(batch_sizes), 2), "max": max(batch_sizes)}}


async def _latency(layouts: dict[str, Settings], raw: Settings, rate: int, duration_s: float, seed: int, turn: int,
                   stage_log: Path) -> dict:
    """The raw baseline and each layout (its own sandbox; FLOOR's is the durable floor) in alternating turns; the
    stage breakdown of DAEMONS."""
    events = int(rate * duration_s)
    arms = {"raw": (_messages(events, seed), raw, RAW_EXCHANGE, raw_listener(raw))}
    for n, (name, settings) in enumerate(layouts.items(), start=1):
        arms[name] = (_messages(events, seed + 10 * n), settings, _route(name)[1], pipeline_listener(settings))
    load = os.getloadavg()[0]
    arrivals = await _measure_in_turns(arms, rate, turn)
    ms = {name: percentiles(arrivals[name].latencies_ms(arm[0])) for name, arm in arms.items()}
    row = {"raw_ms": ms["raw"], "floor_ms": ms[FLOOR], "pipeline_ms": ms[DAEMONS], "one_process_ms": ms[ONE_PROCESS],
           "p95_ratio": round(ms[DAEMONS]["p95"] / ms["raw"]["p95"], 2),
           "load_avg_1m": [round(load, 2), round(os.getloadavg()[0], 2)]}
    for name, key in ((FLOOR, "floor"), (DAEMONS, "pipeline"), (ONE_PROCESS, "one_process")):
        for below, suffix in (("raw", "delta_ms"), (FLOOR, "over_floor_ms")):
            if name != below:
                row[f"{key}_{suffix}"] = {q: round(ms[name][q] - ms[below][q], 2) for q in ("p50", "p95", "p99")}
    row["breakdown"] = _breakdown(stage_log, arrivals[DAEMONS], {event_id for event_id, _, _ in arms[DAEMONS][0]})
    return row


async def _throughput(layouts: dict[str, tuple[Settings, list[subprocess.Popen]]], raw: Settings,
                      events: int) -> dict:
    load = os.getloadavg()[0]
    _, raw_rate = await _measure(raw, _messages(events, 42), None, RAW_EXCHANGE, raw_listener(raw))
    result = {"events": events, "consumers": list(THROUGHPUT_CONSUMERS), "raw_events_per_s": round(raw_rate)}
    for n, (name, (settings, daemons)) in enumerate(layouts.items()):
        cpu_before = _cpu_s(daemons)
        _, rate = await _measure(settings, _messages(events, 43 + n), None, _route(name)[1],
                                 pipeline_listener(settings), THROUGHPUT_CONSUMERS)
        key = {FLOOR: "floor", DAEMONS: "pipeline", ONE_PROCESS: "one_process"}[name]
        result.update({f"{key}_events_per_s": round(rate), f"{key}_ratio": round(rate / raw_rate, 2),
                       f"{key}_cpu_ms_per_event": round((_cpu_s(daemons) - cpu_before) * 1000 / events, 3)})
    for key in ("pipeline", "one_process"):
        result[f"{key}_of_floor"] = round(result[f"{key}_events_per_s"] / result["floor_events_per_s"], 2)
    # A pass of its own for the profile, so that the sampler's CPU is in none of the figures above.
    settings, daemons = layouts[ONE_PROCESS]
    profile = result["one_process_profile"] = {"events": events // 2}
    with sampled(daemons[0].pid, profile):
        await _measure(settings, _messages(events // 2, 47), None, EXCHANGE, pipeline_listener(settings),
                       THROUGHPUT_CONSUMERS)
    result["load_avg_1m"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    return result


async def run(base: Settings, *, duration_s: float = 8.0, throughput_events: int = 20_000, turn: int = 250,
              log=print) -> dict:
    results: dict = {"latency": {}, "cpus": os.cpu_count()}
    async with (sandbox(base, prefix="sntrack-bench") as settings,
                sandbox(base, prefix="sntrack-bench") as single,
                sandbox(base, prefix="sntrack-bench") as durable):
        layouts = {FLOOR: durable, DAEMONS: settings, ONE_PROCESS: single}
        for each in (settings, single):
            conn = await asyncpg.connect(each.database_url)
            await conn.execute(NOTIFY_TRIGGER)
            await conn.close()
        await _declare_raw(settings)
        with tempfile.TemporaryDirectory(prefix="sntrack-bench-stages-") as folder:
            stage_log = Path(folder)
            daemons = {FLOOR: _start_floor(durable, LATENCY_CONSUMERS),
                       DAEMONS: _start_consumers(settings, LATENCY_CONSUMERS, stage_log),
                       ONE_PROCESS: _start_consumers(single, LATENCY_CONSUMERS, together=True)}
            try:
                for name, each in layouts.items():
                    prefix, exchange = _route(name)
                    await _wait_for_consumers(each, LATENCY_CONSUMERS, prefix)
                    await _measure(each, _messages(500, seed=99), None, exchange, pipeline_listener(each))  # warm-up
                for seed, rate in enumerate((250, 500), start=1):
                    log(f"latency at {rate} events/s: {int(rate * duration_s)} events each, raw, {FLOOR}, {DAEMONS} "
                        f"and {ONE_PROCESS} in alternating turns of {turn}")
                    row = results["latency"][str(rate)] = await _latency(layouts, settings, rate, duration_s, seed,
                                                                         turn, stage_log)
                    log(f"  raw {row['raw_ms']}\n  {FLOOR} {row['floor_ms']}\n  {DAEMONS} {row['pipeline_ms']}\n"
                        f"  {ONE_PROCESS} {row['one_process_ms']}  (load {row['load_avg_1m']})")
                daemons[DAEMONS] += _start_consumers(settings, ("comparison",))
                _stop(daemons[ONE_PROCESS] + daemons[FLOOR])
                daemons[ONE_PROCESS] = _start_consumers(single, THROUGHPUT_CONSUMERS, together=True)
                daemons[FLOOR] = _start_floor(durable, THROUGHPUT_CONSUMERS)
                for name, each in layouts.items():
                    await _wait_for_consumers(each, THROUGHPUT_CONSUMERS, _route(name)[0])
                log(f"throughput: {throughput_events} events published as fast as confirms allow")
                tp = results["throughput"] = await _throughput(
                    {name: (layouts[name], daemons[name]) for name in layouts}, settings, throughput_events)
            finally:
                for each in daemons.values():
                    _stop(each)
        log(f"  raw {tp['raw_events_per_s']:,}/s  {FLOOR} {tp['floor_events_per_s']:,}/s  {DAEMONS} "
            f"{tp['pipeline_events_per_s']:,}/s  {ONE_PROCESS} {tp['one_process_events_per_s']:,}/s")
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
