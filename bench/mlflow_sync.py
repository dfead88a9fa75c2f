"""MLflow sync latency: stop event published → its tags, final metrics and terminal state written to MLflow,
beside the bare single-call round-trip (`set-tag`) measured in the same run against the same server.

Target (issue 5): sync p95 ≤ 2 × the set-tag p95, and under 500 ms. The settings must point at a scratch
database and vhost with the topology applied and migrations run, and at a running MLflow server
(infra/mlflow/serve.sh); the experiment gets a fresh name.

A stop counts as synced when the consumer committed its bookkeeping (`applied_events.applied_at`, taken after the
MLflow calls returned: they are then visible to any reader); every run is checked through the API at the end.
Stops are published one at a time, each after the previous one synced, so the figure is latency, not queueing.

Curve throughput: a study of many epochs published at once (start, every epoch's metric event, stop), timed from
the first publish to the last stop synced, beside the same points written by bare `log-batch` calls, one per trial
(the least MLflow work the curves need), in the same run.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import aio_pika
import asyncpg

from bench.timing import percentiles
from consumers.mlflow.client import MlflowRest
from consumers.mlflow.expected import RUN_STATUS
from consumers.mlflow.sync import writes_for
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE
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


async def bare_set_tag(client: MlflowRest, run_id: str, calls: int) -> list[float]:
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        await client.set_tag(run_id, "bench", str(i))
        samples.append((time.perf_counter() - started) * 1000)
    return samples


async def curve_throughput(settings: Settings, trials: int, epochs: int) -> dict:
    """Metric events synced per second through the consumer, beside bare log-batch calls of the same points."""
    settings = settings.model_copy(update={"mlflow_enabled": True,
                                           "mlflow_experiment": f"bench-curve-{uuid.uuid4().hex[:8]}"})
    study = synthetic_study(trials, epochs, seed=2, producer=producer_info())
    events = [e for trial in study for e in trial]
    client = MlflowRest(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
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
    settings = settings.model_copy(update={"mlflow_enabled": True,
                                           "mlflow_experiment": f"bench-{uuid.uuid4().hex[:8]}"})
    study = synthetic_study(trials + warmup, 1, seed=1, producer=producer_info())
    client = MlflowRest(settings.mlflow_tracking_uri, settings.mlflow_timeout_s)
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
        set_tag_ms = await bare_set_tag(client, run_ids[0], len(sync_ms))
    finally:
        await conn.close()
        await connection.close()
        await client.close()
    sync, bare = percentiles(sync_ms), percentiles(set_tag_ms)
    return {"experiment_id": experiment_id, "sync_ms": sync, "set_tag_ms": bare,
            "p95_ratio": sync["p95"] / bare["p95"], "target_met": sync["p95"] <= 2 * bare["p95"] and sync["p95"] < 500}
