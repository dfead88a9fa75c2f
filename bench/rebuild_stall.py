"""The longest reader stall during a rebuild of 100k trials under a live stream, in ms.

A scratch vhost and database get a journal of `trials` trials (start, one epoch, stop: 3 events each, COPYed in),
and the live `trials` tables are built from it. Then a live stream runs: a publisher at `rate` events/s of other
trials through `sntrack consume journal` and `sntrack consume trials`, as deployed. A reader loops the dashboard's
trial-list query (consumers.dashboard.queries.TRIALS: the newest 200 trials with their latest epoch, from `trials`
and `trial_metrics`) on its own connection, back to back, timing each read:

- baseline: for `baseline_s` seconds under the same stream, no rebuild;
- then while `sntrack replay trials` (its own process) rebuilds the 100k trials and swaps them in.

The figure is the longest single read in each window; the swap's lock time is what `sntrack replay` prints.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import aio_pika
import asyncpg

from bench import pipeline
from bench.timing import percentiles
from consumers.dashboard.queries import TRIALS
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE
from sntrack.settings import Settings
from tests.sandbox import sandbox

TEMPLATE_TRIALS = 1000  # generated once, then copied with fresh ids: generating 100k trials takes half a minute
JOURNAL_COLUMNS = ("event_id", "event_type", "trial_id", "model_run_id", "seq", "schema_version", "occurred_at",
                   "envelope")
REBUILT = "bench-rebuild"
STREAM_S = 240  # the live stream's length after the baseline: longer than a rebuild takes
SWAP = re.compile(r"locks held (\d+) ms")


def journal_rows(trials: int, seed: int, *, epochs: int = 1, template_trials: int = TEMPLATE_TRIALS):
    """Journal rows of `trials` trials of up to `epochs` epochs (search REBUILT): a template study of
    `template_trials` trials copied with new event and trial ids."""
    template = synthetic_study(template_trials, epochs, seed=seed, producer=producer_info("bench"),
                               model_run_id=REBUILT)
    dumped = [[(event, event.model_dump_json()) for event in trial] for trial in template]
    for n in range(trials):
        copy, trial = divmod(n, template_trials)
        for event, body in dumped[trial]:
            event_id, trial_id = uuid.uuid4(), f"{event.trial_id}-c{copy:03d}"
            envelope = body.replace(str(event.event_id), str(event_id)).replace(f'"{event.trial_id}"', f'"{trial_id}"')
            yield (event_id, event.event_type, trial_id, event.model_run_id, event.seq, event.schema_version,
                   event.occurred_at, envelope)


class Reader:
    """The dashboard's trial-list query, back to back on one connection; each read's latency in ms."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn
        self.samples: list[float] = []

    async def run_while(self, busy: asyncio.Future | None = None, seconds: float = 0.0) -> list[float]:
        self.samples = []
        deadline = time.monotonic() + seconds
        while (time.monotonic() < deadline) if busy is None else not busy.done():
            started = time.perf_counter()
            await self.conn.fetch(TRIALS, None, 200)
            self.samples.append((time.perf_counter() - started) * 1000)
        return self.samples


def _window(samples: list[float]) -> dict:
    return {**percentiles(samples), "max": round(max(samples), 2)}


async def _stream(settings: Settings, messages: list, rate: float, stop: asyncio.Event) -> int:
    """Publish `messages` at `rate` events/s, a second's worth at a time, until `stop` (checked between seconds) or
    the end of `messages`; how many were published."""
    connection = await aio_pika.connect(settings.amqp_url)
    sent = 0
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        step = max(1, int(rate))
        while not stop.is_set() and sent < len(messages):
            await pipeline._publish(exchange, messages[sent:sent + step], rate, {})
            sent += len(messages[sent:sent + step])
    finally:
        await connection.close()
    return sent


async def _rebuild(settings: Settings) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", "replay", "trials", env=env,
                                                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, stderr = await proc.communicate()
    return subprocess.CompletedProcess(["sntrack", "replay", "trials"], proc.returncode, "", stderr.decode())


async def run(base: Settings, *, trials: int = 100_000, rate: float = 200.0, baseline_s: float = 10.0,
              log=print) -> dict:
    load_before = os.getloadavg()[0]
    async with sandbox(base, prefix="sntrack-bench-stall") as settings:
        conn = await asyncpg.connect(settings.database_url)
        try:
            started = time.perf_counter()
            await conn.copy_records_to_table("events", records=journal_rows(trials, seed=5), columns=JOURNAL_COLUMNS)
            events = await conn.fetchval("SELECT count(*) FROM events")
            log(f"journal of {trials:,} trials ({events:,} events) in {time.perf_counter() - started:.1f} s")
            pool = await asyncpg.create_pool(settings.database_url, min_size=2, max_size=2)
            try:
                await replay(pool, PROJECTIONS["trials"])  # the live tables the rebuild will replace
            finally:
                await pool.close()
            await conn.execute("ANALYZE")
            log(f"and its live trials tables after {time.perf_counter() - started:.1f} s")
            # Made before the clock starts: generating them in the reader's event loop would stall it.
            messages = pipeline._messages(int(rate * (baseline_s + STREAM_S)), seed=7)
            daemons = pipeline._start_consumers(settings)
            stream = None
            try:
                await pipeline._wait_for_consumers(settings)
                stop = asyncio.Event()
                stream = asyncio.create_task(_stream(settings, messages, rate, stop))
                reader = Reader(conn)
                baseline = _window(await reader.run_while(seconds=baseline_s))
                log(f"baseline, {baseline_s:g} s under the stream: {baseline}")
                rebuilding = asyncio.ensure_future(_rebuild(settings))
                during = _window(await reader.run_while(rebuilding))
                rebuilt = await rebuilding
                if rebuilt.returncode != 0:
                    raise RuntimeError(f"sntrack replay trials failed: {rebuilt.stderr[-2000:]}")
                log(f"during the rebuild: {during}; {rebuilt.stderr.strip().splitlines()[-1]}")
                if stream.done():  # the stream must outlast the rebuild
                    raise RuntimeError(f"the live stream ended before the rebuild did: {stream.exception()!r}")
                stop.set()
                streamed = await stream
            finally:
                if stream is not None and not stream.done():
                    stream.cancel()
                for daemon in daemons:
                    daemon.send_signal(signal.SIGTERM)
                for daemon in daemons:
                    daemon.wait(timeout=30)
            rebuilt_trials = await conn.fetchval("SELECT count(*) FROM trials WHERE model_run_id = $1", REBUILT)
        finally:
            await conn.close()
    swap = SWAP.search(rebuilt.stderr)
    summary = rebuilt.stderr.strip().splitlines()[-1]
    return {"trials": trials, "rebuilt_trials": rebuilt_trials, "journal_events": events, "stream_rate": rate,
            "streamed_events": streamed, "baseline_s": baseline_s, "baseline_ms": baseline, "rebuild_ms": during,
            "swap_locks_ms": int(swap.group(1)) if swap else None, "replay": summary,
            "stall_ms": during["max"], "load_avg_1m": [load_before, os.getloadavg()[0]], "cpus": os.cpu_count()}
