"""Catch-up rate of a new subscriber (events/s read from the journal and delivered) beside `sntrack replay`'s rate
of the `trials` projection over the same journal, in the same run on the same scratch vhost and database.

The journal is filled directly (COPY of a synthetic study's events into `events`): this measures reading it, not
the pipeline. The subscriber is the one `sntrack subscribe NAME --from-start --jsonl FILE` runs, in process: it
binds its queue, then delivers the whole journal to a JSON-lines file (written and flushed event by event), and
its catch-up is timed from the start until it goes live.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import asyncpg

from consumers.catchup import CatchUpSubscriber, Start, SubscriberRuntime, run_subscriber
from consumers.persistence import create_pool
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from consumers.runtime import connect
from consumers.subscriber import JsonLinesSink
from producer.emitter import producer_info
from producer.sample import synthetic_study
from sntrack.settings import Settings
from tests.sandbox import sandbox

EPOCHS = 48  # events per trial: start, up to 48 metrics, stop
COLUMNS = ("event_id", "event_type", "trial_id", "model_run_id", "seq", "schema_version", "occurred_at", "envelope")


def _records(events: int) -> list[tuple]:
    study = synthetic_study(max(1, events // (EPOCHS + 2)), EPOCHS, producer=producer_info(), seed=11)
    return [(e.event_id, e.event_type, e.trial_id, e.model_run_id, e.seq, e.schema_version, e.occurred_at,
             e.model_dump_json()) for trial in study for e in trial]


async def _fill(database_url: str, records: list[tuple]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        # COPY is binary: jsonb's binary form is a version byte (1) then the text.
        await conn.set_type_codec("jsonb", encoder=lambda text: b"\x01" + text.encode(),
                                  decoder=lambda data: data[1:].decode(), schema="pg_catalog", format="binary")
        await conn.copy_records_to_table("events", records=records, columns=COLUMNS)
        await conn.execute("ANALYZE events")
    finally:
        await conn.close()


async def _catch_up(settings: Settings, out: Path) -> dict:
    config = settings.consumer()
    pool = await create_pool(settings.database_url, max_size=3)
    try:
        with out.open("a", encoding="utf-8") as stream:
            subscriber = CatchUpSubscriber("bench", ["ml.run.#"], JsonLinesSink(stream), pool)
            started = time.perf_counter()
            await subscriber.load(Start(from_start=True))
            connection = await connect(config)
            running = asyncio.create_task(run_subscriber(subscriber, SubscriberRuntime(subscriber, config), connection))
            try:
                await subscriber.caught_up.wait()
                seconds = time.perf_counter() - started
            finally:
                subscriber.stop()
                await running
                await connection.close()
            size = stream.tell()
    finally:
        await pool.close()
    events = subscriber.delivered["journal"]
    return {"events": events, "seconds": round(seconds, 2), "events_per_s": round(events / seconds),
            "output_bytes": size}


async def run(base: Settings, events: int = 100_000) -> dict:
    records = await asyncio.to_thread(_records, events)
    load_before = round(os.getloadavg()[0], 2)
    async with sandbox(base, prefix="sntrack-bench-catchup") as settings:
        await _fill(settings.database_url, records)
        with tempfile.TemporaryDirectory(prefix="sntrack-bench-catchup-") as folder:
            subscriber = await _catch_up(settings, Path(folder) / "events.jsonl")
        pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=2)
        try:
            replayed = await replay(pool, PROJECTIONS["trials"])
        finally:
            await pool.close()
    return {"journal_events": len(records), "subscriber": subscriber,
            "replay": {"events": replayed.events, "seconds": round(replayed.seconds, 2),
                       "events_per_s": round(replayed.events_per_s)},
            "ratio": round(subscriber["events_per_s"] / replayed.events_per_s, 2), "cpus": os.cpu_count(),
            "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)]}
