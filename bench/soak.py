"""`make soak`: one million events from 100 simulated workers through the journal, trials and comparison daemons.

Each simulated worker is an asyncio task with its own AMQP connection: it runs synthetic trials one after another
and publishes their events with publisher confirms (a trial's confirms awaited before the next trial), paced so
that the workers together publish `--rate` events/s.
The consumers run as three `sntrack consume` daemons, as deployed. Once a second the harness samples each queue's
backlog (a passive declare: messages ready, not yet delivered), the journal's length and each daemon's RSS.

At the end it checks by count that nothing was lost or applied twice, times the dashboard's comparison query, and
weighs the exactly-once bookkeeping against the journal. Results: bench/results/soak.md, soak.json and the lag
curve soak_lag.png. The `mlflow` queue is deleted in the soak's own vhost: the soak measures the event backbone,
not an MLflow server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import asyncpg

from bench.timing import percentiles
from consumers.pruning import KEEP
from consumers.report.queries import (
    AVG_VAL_ACCURACY_BY_FLAG,
    AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS,
    COMPARISON_COLUMNS,
    COMPARISON_FROM_TRIALS,
)
from producer.emitter import producer_info
from producer.sample import synthetic_trial
from schemas import EXCHANGE
from schemas.topology import RUN_METRIC, RUN_START, RUN_STOP
from sntrack.logging import configure_logging
from sntrack.settings import Settings
from tests.sandbox import sandbox

RESULTS = Path(__file__).parent / "results"
DAEMONS = ("journal", "trials", "comparison")
QUEUES = {name: f"sntrack.{name}" for name in DAEMONS}
EPOCHS = 20


@dataclass
class Published:
    events: int = 0
    by_type: dict[str, int] = field(default_factory=lambda: {RUN_START: 0, RUN_METRIC: 0, RUN_STOP: 0})
    study: str = field(default_factory=lambda: f"soak-{os.getpid()}")


async def _worker(number: int, settings: Settings, budget: list[int], rate: float, published: Published) -> None:
    """Run trials until the shared event budget is spent, publishing each event at this worker's share of the rate."""
    rng = random.Random(number)
    producer = producer_info(f"soak-worker-{number}")
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        interval, next_at, trial = 1 / rate, time.perf_counter() + rng.uniform(0, 1 / rate), 0
        while budget[0] > 0:
            events = synthetic_trial(rng, published.study, producer, EPOCHS, number * 1_000_000 + trial)
            trial += 1
            budget[0] -= len(events)
            confirms = []
            for event in events:
                if (delay := next_at - time.perf_counter()) > 0:
                    await asyncio.sleep(delay)
                next_at += interval
                confirms.append(asyncio.ensure_future(exchange.publish(
                    aio_pika.Message(event.to_json(), message_id=str(event.event_id), content_type="application/json",
                                     delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key=event.event_type)))
            await asyncio.gather(*confirms)  # a worker's trial is durable before its next starts, as a spool flush
            published.events += len(events)
            for event in events:
                published.by_type[event.event_type] += 1
    finally:
        await connection.close()


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _backlogs(channel: aio_pika.abc.AbstractChannel) -> dict[str, int]:
    """Messages ready in each consumer's queue (a passive declare answers at once; the management API lags)."""
    found = {}
    for name, queue in QUEUES.items():
        declared = await channel.declare_queue(queue, passive=True)
        found[name] = declared.declaration_result.message_count
    return found


async def _sample(settings: Settings, daemons: dict[str, subprocess.Popen], published: Published, samples: list,
                  stop: asyncio.Event, started: float, log) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        channel = await connection.channel()
        while not stop.is_set():
            every_tenth = len(samples) % 10 == 0
            journal = await conn.fetchval("SELECT count(*) FROM events") if every_tenth else None
            sample = {"t": round(time.perf_counter() - started, 2), "published": published.events,
                      "backlog": await _backlogs(channel), "journal": journal,
                      "rss_mb": {name: _rss_mb(p.pid) for name, p in daemons.items()}}
            samples.append(sample)
            if every_tenth:
                log(f"[soak] {sample['t']:7.0f} s  published {published.events:,}  journal {journal:,}  "
                    f"backlog {sample['backlog']}  rss MB {({k: round(v or 0) for k, v in sample['rss_mb'].items()})}")
            with_timeout = asyncio.create_task(stop.wait())
            await asyncio.wait({with_timeout}, timeout=1.0)
            with_timeout.cancel()
    finally:
        await conn.close()
        await connection.close()


async def _drained(settings: Settings, published: Published, timeout_s: float) -> float:
    """Seconds until every queue is empty and every projection has applied every event it receives."""
    started = time.perf_counter()
    connection = await aio_pika.connect(settings.amqp_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        channel = await connection.channel()
        while time.perf_counter() - started < timeout_s:
            applied = {"comparison": await conn.fetchval(
                "SELECT count(*) FROM applied_events WHERE projection = 'comparison'")}
            # The journal keeps no applied_events rows, and trials' metric rows are pruned: count their rows instead.
            applied["journal"] = await conn.fetchval("SELECT count(*) FROM events")
            applied["trials"] = await conn.fetchval(
                "SELECT (SELECT count(*) FROM trial_metrics) + count(started_at) + count(finished_at) FROM trials")
            wanted = {"journal": published.events, "trials": published.events,
                      "comparison": published.by_type[RUN_STOP]}
            if all(applied.get(k, 0) >= v for k, v in wanted.items()) and not any((await _backlogs(channel)).values()):
                return time.perf_counter() - started
            await asyncio.sleep(1)
        raise RuntimeError(f"the consumers did not drain within {timeout_s:.0f} s")
    finally:
        await conn.close()
        await connection.close()


async def _counts(settings: Settings, published: Published) -> dict:
    conn = await asyncpg.connect(settings.database_url)
    try:
        columns = ", ".join(COMPARISON_COLUMNS)
        stored = f"SELECT {columns} FROM sn_comparison"
        recounted = f"SELECT {columns} FROM ({COMPARISON_FROM_TRIALS}) AS recount"
        differing = await conn.fetchval(f"SELECT count(*) FROM (({stored} EXCEPT {recounted}) UNION ALL "
                                        f"({recounted} EXCEPT {stored})) AS d")
        return {
            "published": published.events, "published_by_type": published.by_type,
            "journal": await conn.fetchval("SELECT count(*) FROM events"),
            "journal_distinct": await conn.fetchval("SELECT count(DISTINCT event_id) FROM events"),
            "trials": await conn.fetchval("SELECT count(*) FROM trials"),
            "trials_stopped": await conn.fetchval("SELECT count(*) FROM trials WHERE finished_at IS NOT NULL"),
            "trial_metrics": await conn.fetchval("SELECT count(*) FROM trial_metrics"),
            "applied": dict(await conn.fetch("SELECT projection, count(*) FROM applied_events GROUP BY projection")),
            "comparison_trials": await conn.fetchval(
                "SELECT COALESCE(sum(trials), 0) FROM sn_comparison WHERE model_run_id <> '*'"),
            "comparison_rows_differing_from_trials": differing,
        }
    finally:
        await conn.close()


async def _comparison_query(settings: Settings, study: str) -> dict:
    conn = await asyncpg.connect(settings.database_url)
    try:
        timings = {}
        for label, sql, args, repetitions in (("sn_comparison", AVG_VAL_ACCURACY_BY_FLAG, (study,), 500),
                                              ("baseline_group_by_trials", AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS, (),
                                               10)):
            statement = await conn.prepare(sql)
            samples = []
            for _ in range(repetitions):
                began = time.perf_counter()
                await statement.fetch(*args)
                samples.append((time.perf_counter() - began) * 1000)
            timings[label] = percentiles(samples)
        return timings
    finally:
        await conn.close()


async def _sizes(settings: Settings) -> dict:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("VACUUM ANALYZE")
        row = await conn.fetchrow("SELECT pg_total_relation_size('events') AS journal, "
                                  "pg_total_relation_size('applied_events') AS bookkeeping")
        return dict(row)
    finally:
        await conn.close()


def _start_daemons(settings: Settings) -> dict[str, subprocess.Popen]:
    env = {**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"}
    return {name: subprocess.Popen([sys.executable, "-m", "sntrack", "consume", name], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in DAEMONS}


async def _drop_mlflow_queue(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.queue_delete("sntrack.mlflow")
    finally:
        await connection.close()


async def run(base: Settings, *, events: int, workers: int, rate: float, log=print) -> dict:
    published = Published()
    samples: list[dict] = []
    async with sandbox(base, prefix="sntrack-soak") as settings:
        await _drop_mlflow_queue(settings)
        daemons = _start_daemons(settings)
        try:
            started = time.perf_counter()
            stop = asyncio.Event()
            sampler = asyncio.create_task(_sample(settings, daemons, published, samples, stop, started, log))
            budget = [events]
            await asyncio.gather(*(_worker(n, settings, budget, rate / workers, published) for n in range(workers)))
            publish_s = time.perf_counter() - started
            drain_s = await _drained(settings, published, timeout_s=max(600, publish_s))
            stop.set()
            await sampler
        finally:
            for daemon in daemons.values():
                daemon.send_signal(signal.SIGTERM)
            exits = {name: daemon.wait(timeout=60) for name, daemon in daemons.items()}
        counts = await _counts(settings, published)
        query = await _comparison_query(settings, published.study)
        sizes = await _sizes(settings)
    peak = {name: max((s["rss_mb"][name] or 0) for s in samples) for name in DAEMONS}
    first_minute = {name: max((s["rss_mb"][name] or 0) for s in samples if s["t"] <= 60) for name in DAEMONS}
    return {
        "events": published.events, "workers": workers, "target_rate": rate, "epochs_per_trial": EPOCHS,
        "publish_s": round(publish_s, 1), "published_per_s": round(published.events / publish_s),
        "drain_after_publish_s": round(drain_s, 1), "daemon_exit_codes": exits,
        "max_backlog": {name: max(s["backlog"][name] for s in samples) for name in DAEMONS},
        "rss_peak_mb": {k: round(v, 1) for k, v in peak.items()},
        "rss_peak_first_minute_mb": {k: round(v, 1) for k, v in first_minute.items()},
        "counts": counts, "comparison_query_ms": query,
        "bytes": {**sizes, "journal_per_million_events": round(sizes["journal"] * 1e6 / published.events),
                  "bookkeeping_per_million_events": round(sizes["bookkeeping"] * 1e6 / published.events),
                  "bookkeeping_over_journal": round(sizes["bookkeeping"] / sizes["journal"], 3)},
        "samples": samples,
    }


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]
    fig, (lag, rss) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for name in DAEMONS:
        lag.plot(t, [s["backlog"][name] for s in samples], label=f"{name} queue backlog")
        rss.plot(t, [s["rss_mb"][name] or 0 for s in samples], label=f"consume {name}")
    lag.set_ylabel("messages ready")
    lag.set_title(f"Soak: {result['events']:,} events from {result['workers']} simulated workers "
                  f"at {result['target_rate']:,.0f} events/s")
    lag.legend()
    rss.set_ylabel("RSS, MB")
    rss.set_xlabel("seconds since the first publish")
    rss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(result: dict) -> str:
    c, b, q = result["counts"], result["bytes"], result["comparison_query_ms"]
    lost = c["journal"] - c["published"]
    backlog = " / ".join(f"{result['max_backlog'][n]:,}" for n in DAEMONS)
    rss = " / ".join(f"{result['rss_peak_mb'][n]} ({result['rss_peak_first_minute_mb'][n]})" for n in DAEMONS)
    return "\n".join([
        f"# Soak — {result['finished']} on {result['machine']}", "",
        f"{result['events']:,} events ({c['published_by_type'][RUN_START]:,} trials of up to {EPOCHS} epochs) from "
        f"{result['workers']} simulated workers, each with its own AMQP connection and publisher confirms, paced to "
        f"{result['target_rate']:,.0f} events/s in all; `sntrack consume journal`, `trials` and `comparison` as three "
        f"daemons. Lag curve and RSS: [soak_lag.png](soak_lag.png).", "",
        "| figure | value |", "|---|---|",
        f"| publishing took | {result['publish_s']} s ({result['published_per_s']:,} events/s) |",
        f"| the consumers had drained everything | {result['drain_after_publish_s']} s after the last publish |",
        f"| largest backlog, messages ready: journal / trials / comparison | "
        f"{backlog} |",
        f"| peak RSS, MB: journal / trials / comparison (peak in the first minute) | "
        f"{rss} |",
        f"| journal rows / distinct event ids / published | {c['journal']:,} / {c['journal_distinct']:,} / "
        f"{c['published']:,} (difference {lost:+,}) |",
        f"| trials rows / stopped / starts and stops published | {c['trials']:,} / {c['trials_stopped']:,} / "
        f"{c['published_by_type'][RUN_START]:,} and {c['published_by_type'][RUN_STOP]:,} |",
        f"| trial_metrics rows / metric events published | {c['trial_metrics']:,} / "
        f"{c['published_by_type'][RUN_METRIC]:,} |",
        f"| applied_events rows per projection (trials' metric rows pruned once journaled, the newest {KEEP:,} journal "
        f"positions' kept) | {', '.join(f'{k} {v:,}' for k, v in sorted(c['applied'].items()))} |",
        f"| sn_comparison rows differing from a recount over trials | {c['comparison_rows_differing_from_trials']} |",
        f"| comparison query (sn_comparison), p50 / p95 / p99 ms | {q['sn_comparison']['p50']} / "
        f"{q['sn_comparison']['p95']} / {q['sn_comparison']['p99']} (target p95 < 1 ms) |",
        f"| baseline: the same figures by GROUP BY over trials, p50 / p95 ms | "
        f"{q['baseline_group_by_trials']['p50']} / {q['baseline_group_by_trials']['p95']} |",
        f"| journal bytes per million events | {b['journal_per_million_events']:,} |",
        f"| bookkeeping (applied_events) bytes per million events | {b['bookkeeping_per_million_events']:,} "
        f"({b['bookkeeping_over_journal']:.1%} of the journal; goal ≤ 10%) |",
        f"| daemon exit codes after SIGTERM | {result['daemon_exit_codes']} |",
        "", f"1-minute load average before / after: {result['load_before']} / {result['load_after']} on "
        f"{os.cpu_count()} CPUs.", ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events to publish (default 1,000,000)")
    parser.add_argument("--workers", type=int, default=100, help="simulated workers (default 100)")
    parser.add_argument("--rate", type=float, default=1000.0, help="events/s for all workers together (default 1000)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for soak.md, soak.json, soak_lag.png")
    args = parser.parse_args(argv)
    if args.events < 1 or args.workers < 1 or not args.rate > 0:
        parser.error("--events, --workers and --rate must be positive")
    configure_logging(json_lines=False, level=logging.WARNING)
    load_before = round(os.getloadavg()[0], 2)
    result = asyncio.run(run(Settings.from_env(), events=args.events, workers=args.workers, rate=args.rate))
    result.update(finished=datetime.now(UTC).isoformat(timespec="seconds"), machine=os.uname().nodename,
                  load_before=load_before, load_after=round(os.getloadavg()[0], 2))
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(result, args.out / "soak_lag.png")
    (args.out / "soak.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "soak.md").write_text(_markdown(result))
    print(_markdown(result))
    c = result["counts"]
    intact = (c["journal"] == c["journal_distinct"] == c["published"]
              and c["trial_metrics"] == c["published_by_type"][RUN_METRIC]
              and c["trials"] == c["published_by_type"][RUN_START]
              and c["comparison_rows_differing_from_trials"] == 0)
    return 0 if intact else 1


if __name__ == "__main__":
    sys.exit(main())
