"""MLflow sync: the latency of a stop, the drain rate of a backlog and the time a graceful stop takes, each beside
the same REST calls issued bare (the consumer's own client, the same server, the same run).

The settings must point at a scratch database and vhost with the topology applied and migrations run, and at a
running MLflow server (infra/mlflow/serve.sh); each figure gets an experiment of its own.

Latency (target: sync p95 ≤ 2 × bare p95, issue 12): stop published → its tags, final metrics and terminal state
written. A stop counts as synced when the consumer committed its bookkeeping (`applied_events.applied_at`, taken
after the MLflow calls returned: they are then visible to any reader); every run is checked through the API at the
end. Stops are published one at a time, each after the previous one synced, so the figure is latency, not
queueing. Baseline: the calls the consumer makes for a stop (`sync.send`: one log-batch with the tags and final
metrics, and runs/update, sent together), issued directly on runs of their own.

Backlog drain (target: ≥ 70% of bare): trials whose start carries no run id (start, one epoch, stop), all queued
before `consume mlflow` starts, timed until the last event is synced. Baseline: the REST calls the consumer makes
for them, issued bare with the same concurrency (`SNTRACK_MLFLOW_CONCURRENCY` trials at a time): per trial the
search by `trial_id` tag, runs/create, then log-batch and runs/update together.

Graceful stop (target: ≤ 5 s): a backlog is queued, `sntrack consume mlflow` runs as its own process, and SIGTERM
is sent once it has linked its first runs; the figure is SIGTERM → exit. Then the rest is drained and counted:
every event synced once, one run per trial.

Curve throughput: a study of many epochs published at once (start, every epoch's metric event, stop), timed from
the first publish to the last stop synced, beside the same points written by bare `log-batch` calls, one per trial
(the least MLflow work the curves need), in the same run.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime

import aio_pika
import asyncpg

from bench.timing import percentiles
from consumers.mlflow.client import MlflowRest, filter_string
from consumers.mlflow.expected import RUN_STATUS
from consumers.mlflow.sync import create_trial_run, send, writes_for
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE, Event
from sntrack.settings import Settings


async def _applied_at(conn: asyncpg.Connection, event_id: uuid.UUID, timeout_s: float) -> datetime:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at = await conn.fetchval("SELECT applied_at FROM applied_events WHERE projection = 'mlflow' AND event_id = $1",
                                 event_id)
        if at is not None:
            return at
        await asyncio.sleep(0.002)
    raise TimeoutError(f"stop {event_id} not synced within {timeout_s}s")


async def _publish(exchange: aio_pika.abc.AbstractExchange, event) -> None:
    await exchange.publish(aio_pika.Message(event.to_json(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                           routing_key=event.event_type)


async def _publish_all(settings: Settings, events: list[Event]) -> None:
    """Every event, confirmed, 500 in flight at a time."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for start in range(0, len(events), 500):
            await asyncio.gather(*(_publish(exchange, event) for event in events[start:start + 500]))
    finally:
        await connection.close()


async def _synced(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM applied_events WHERE projection = 'mlflow'")


async def _until_synced(conn: asyncpg.Connection, events: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while (done := await _synced(conn)) < events:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {events} events synced within {timeout_s}s")
        await asyncio.sleep(0.05)


def _client(settings: Settings) -> MlflowRest:
    """A client as the consumer makes it (MlflowSync.handle)."""
    return MlflowRest(settings.mlflow_tracking_uri, settings.mlflow_timeout_s,
                      connections=2 * settings.mlflow_concurrency)


async def bare_stop_calls(client: MlflowRest, experiment_id: str, stops: list[Event]) -> list[float]:
    """The consumer's calls for each stop, issued directly, one stop at a time, each on a run of its own."""
    samples = []
    for stop in stops:
        run_id = await client.create_run(experiment_id, "bare", 0)
        writes = writes_for([stop])
        started = time.perf_counter()
        await send(client, run_id, writes)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def bare_trials(client: MlflowRest, experiment_id: str, study: list[list[Event]], concurrency: int) -> float:
    """Seconds for the REST calls the consumer makes for trials it must create runs for, `concurrency` trials at
    a time: the search by tag, runs/create, then the trial's writes (log-batch and runs/update together)."""
    slots = asyncio.Semaphore(concurrency)

    async def one(trial: list[Event]) -> None:
        async with slots:
            await client.search_runs(experiment_id, filter_string("trial_id", trial[0].trial_id))
            run_id = await create_trial_run(client, experiment_id, trial, trial[0].payload.spectral_norm)
            await send(client, run_id, writes_for(trial))

    started = time.perf_counter()
    await asyncio.gather(*(one(trial) for trial in study))
    return time.perf_counter() - started


async def backlog_drain(settings: Settings, trials: int) -> dict:
    """Trials per second through `consume mlflow` for a backlog of trials it must create runs for, beside the same
    calls issued bare with the same concurrency."""
    settings = settings.replace(mlflow_enabled=True, mlflow_experiment=f"bench-backlog-{uuid.uuid4().hex[:8]}")
    study = synthetic_study(trials, 1, seed=3, producer=producer_info())
    events = [e for trial in study for e in trial]
    assert all(trial[0].payload.mlflow_run_id is None for trial in study)
    await _publish_all(settings, events)
    conn = await asyncpg.connect(settings.database_url)
    client = _client(settings)
    try:
        before = await _synced(conn)
        started = time.perf_counter()
        async with running_consumers(settings.consumer(), ["mlflow"]):
            await _until_synced(conn, before + len(events), 600)
            consumer_s = time.perf_counter() - started
        created = await conn.fetchval("SELECT count(*) FROM mlflow_runs WHERE origin = 'created' AND trial_id = "
                                      "ANY($1::text[])", [t[0].trial_id for t in study])
        assert created == trials, f"{created} runs created for {trials} trials"
        experiment_id = await client.experiment_id(settings.mlflow_experiment + "-bare")
        bare_s = await bare_trials(client, experiment_id, study, settings.mlflow_concurrency)
    finally:
        await conn.close()
        await client.close()
    consumer_rate, bare_rate = trials / consumer_s, trials / bare_s
    return {"trials": trials, "events": len(events), "concurrency": settings.mlflow_concurrency,
            "consumer_s": round(consumer_s, 2), "consumer_trials_per_s": round(consumer_rate, 1),
            "bare_s": round(bare_s, 2), "bare_trials_per_s": round(bare_rate, 1),
            "ratio": round(consumer_rate / bare_rate, 2), "target_met": consumer_rate >= 0.7 * bare_rate}


def _daemon(settings: Settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "consume", "mlflow"],
                            env={**os.environ, **settings.to_env(), "SNTRACK_LOG_JSON": "true"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def graceful_stop(settings: Settings, trials: int) -> dict:
    """SIGTERM → exit of `sntrack consume mlflow` with a backlog in hand; then the rest drained and counted."""
    settings = settings.replace(mlflow_enabled=True, mlflow_experiment=f"bench-stop-{uuid.uuid4().hex[:8]}")
    study = synthetic_study(trials, 1, seed=4, producer=producer_info())
    events = [e for trial in study for e in trial]
    trial_ids = [t[0].trial_id for t in study]
    await _publish_all(settings, events)
    conn = await asyncpg.connect(settings.database_url)
    try:
        before = await _synced(conn)
        daemon = _daemon(settings)
        try:
            deadline = time.monotonic() + 120
            while not await conn.fetchval("SELECT count(*) > 0 FROM mlflow_runs WHERE trial_id = ANY($1::text[])",
                                          trial_ids):
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("`sntrack consume mlflow` linked no run within 120 s")
                await asyncio.sleep(0.01)
            daemon.send_signal(signal.SIGTERM)
            signalled = time.perf_counter()
            returncode = await asyncio.to_thread(daemon.wait, 120)
            stop_s = time.perf_counter() - signalled
        finally:
            if daemon.poll() is None:
                daemon.kill()
        left = before + len(events) - await _synced(conn)
        async with running_consumers(settings.consumer(), ["mlflow"]):
            await _until_synced(conn, before + len(events), 600)
        links = await conn.fetchval("SELECT count(*) FROM mlflow_runs WHERE trial_id = ANY($1::text[])", trial_ids)
    finally:
        await conn.close()
    client = _client(settings)
    try:
        experiment_id = await client.experiment_id(settings.mlflow_experiment)
        runs = await client.search_runs(experiment_id, "")
    finally:
        await client.close()
    assert returncode == 0, f"`sntrack consume mlflow` exited {returncode} after SIGTERM"
    assert links == trials and len(runs) == trials, f"{links} links and {len(runs)} runs for {trials} trials"
    return {"trials": trials, "events": len(events), "stop_s": round(stop_s, 2), "left_unsynced": left,
            "target_met": stop_s <= 5}


async def curve_throughput(settings: Settings, trials: int, epochs: int) -> dict:
    """Metric events synced per second through the consumer, beside bare log-batch calls of the same points."""
    settings = settings.replace(mlflow_enabled=True, mlflow_experiment=f"bench-curve-{uuid.uuid4().hex[:8]}")
    study = synthetic_study(trials, epochs, seed=2, producer=producer_info())
    events = [e for trial in study for e in trial]
    client = _client(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    conn = await asyncpg.connect(settings.database_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        async with running_consumers(settings.consumer(), ["mlflow"]):
            started = time.perf_counter()
            for event in events:
                await _publish(exchange, event)
            for trial in study:
                await _applied_at(conn, trial[-1].event_id, 120)
            consumer_s = time.perf_counter() - started
        experiment_id = await client.experiment_id(settings.mlflow_experiment + "-bare")
        started = time.perf_counter()
        for trial in study:
            run_id = await client.create_run(experiment_id, "bare", 0)
            writes = writes_for(trial)
            await client.log_batch(run_id, tags=writes.tags, params=writes.params, metrics=writes.metrics)
        bare_s = time.perf_counter() - started
    finally:
        await conn.close()
        await connection.close()
        await client.close()
    metric_events = sum(e.event_type == "ml.run.metric" for e in events)
    return {"trials": trials, "epochs": epochs, "events": len(events),
            "consumer_events_per_s": round(len(events) / consumer_s, 1), "consumer_s": round(consumer_s, 2),
            "bare_log_batch_s": round(bare_s, 2), "metric_events": metric_events,
            "ratio_to_bare": round(consumer_s / bare_s, 2)}


async def run(settings: Settings, trials: int = 100, warmup: int = 5) -> dict:
    settings = settings.replace(mlflow_enabled=True, mlflow_experiment=f"bench-{uuid.uuid4().hex[:8]}")
    study = synthetic_study(trials + warmup, 1, seed=1, producer=producer_info())
    client = _client(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    conn = await asyncpg.connect(settings.database_url)
    sync_ms: list[float] = []
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)

        async def publish(event) -> float:
            await _publish(exchange, event)
            return time.time()

        async with running_consumers(settings.consumer(), ["mlflow"]):
            for trial in study:  # runs created and linked first: the figure is the stop's sync alone
                await publish(trial[0])
            for trial in study:
                await _applied_at(conn, trial[0].event_id, 30)
            for n, trial in enumerate(study):
                published = time.time()
                await publish(trial[-1])
                applied = await _applied_at(conn, trial[-1].event_id, 30)
                if n >= warmup:
                    sync_ms.append((applied.astimezone(UTC).timestamp() - published) * 1000)
        experiment_id = await client.experiment_id(settings.mlflow_experiment)
        run_ids = [r["run_id"] for r in await conn.fetch("SELECT run_id FROM mlflow_runs")]
        for run_id in run_ids:
            record = await client.get_run(run_id)
            assert record.status in RUN_STATUS.values() and record.tags.get("status") != "running", record
        bare_experiment = await client.experiment_id(settings.mlflow_experiment + "-bare")
        bare_ms = await bare_stop_calls(client, bare_experiment, [trial[-1] for trial in study[warmup:]])
    finally:
        await conn.close()
        await connection.close()
        await client.close()
    sync, bare = percentiles(sync_ms), percentiles(bare_ms)
    return {"experiment_id": experiment_id, "sync_ms": sync, "bare_stop_ms": bare,
            "p95_ratio": sync["p95"] / bare["p95"], "target_met": sync["p95"] <= 2 * bare["p95"] and sync["p95"] < 500}
