"""The worker's /metrics and /healthz (producer.metrics, served from a thread as `sntrack worker --metrics-port`
does): publisher counts, buffer and spool size move as events flow and spool; ready follows the broker and the
Optuna storage, each cut and restored through a fault proxy."""

from __future__ import annotations

import asyncio
import signal
import subprocess

from common.ops_http import OpsServer
from producer.emitter import producer_info
from producer.metrics import WorkerHealth, worker_registry
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.test_ops_metrics import _log_file, _ready, _sample, free_port, metrics, proxy_for, value
from tests.test_worker_pipeline import storage, worker_command  # noqa: F401 - storage is a fixture


async def test_worker_metrics_follow_the_publisher_and_health_the_broker_and_storage(env):
    trials = synthetic_study(4, 2, producer=producer_info(), seed=9)
    first, second = [e for t in trials[:2] for e in t], [e for t in trials[2:] for e in t]
    with proxy_for(env.settings.amqp_url) as broker, proxy_for(env.settings.database_url) as database:
        settings = env.settings.replace(amqp_url=broker.url_for(env.settings.amqp_url))
        publisher = EventPublisher(settings.publisher()).start()
        # The test's database stands in for the Optuna storage: the check is one query on a fresh connection.
        health = WorkerHealth(publisher, database.url_for(env.settings.database_url))
        server = OpsServer("127.0.0.1", 0, worker_registry(publisher, settings.spool_dir), health).start()
        try:
            await wait_until(lambda: _ready(server.port, True), what="ready")
            for event in first:
                publisher.publish(event)
            assert await asyncio.to_thread(publisher.flush, 30)
            sent = await metrics(server.port)
            assert value(sent, "sntrack_publisher_events_total", outcome="confirmed") == len(first)
            assert value(sent, "sntrack_publisher_buffer_events") == 0
            assert value(sent, "sntrack_spool_bytes") == 0

            broker.cut()
            status, checks = await wait_until(lambda: _ready(server.port, False), what="unready, broker away")
            assert status == 503 and checks == {"ready": False, "broker": False, "database": True}
            for event in second:
                publisher.publish(event)
            await wait_until(lambda: _sample(server.port, "sntrack_publisher_events_total", len(second),
                                             outcome="spooled"), what="spooled")
            spooled = await metrics(server.port)
            assert value(spooled, "sntrack_spool_bytes") > 0 and value(spooled, "sntrack_spool_segments") >= 1
            assert value(spooled, "sntrack_publisher_buffer_events") == 0
            broker.restore()
            await wait_until(lambda: _ready(server.port, True), what="ready, broker back")
            await wait_until(lambda: _sample(server.port, "sntrack_publisher_events_total", len(second),
                                             outcome="flushed_from_spool"), what="spool delivered")

            database.cut()
            status, checks = await wait_until(lambda: _ready(server.port, False), what="unready, storage away")
            assert checks == {"ready": False, "broker": True, "database": False}
            database.restore()
            await wait_until(lambda: _ready(server.port, True), what="ready, storage back")
        finally:
            server.close()
            await asyncio.to_thread(publisher.close)
    assert await env.fetchval("SELECT 1") == 1


async def test_sntrack_worker_serves_metrics_while_it_trains(env, storage, tmp_path):  # noqa: F811
    port = free_port()
    command, environ = worker_command(env, storage, "observed", "--n-trials", "50", "--no-mlflow",
                                      "--metrics-port", str(port))
    with _log_file(tmp_path / "worker.log") as log:
        worker = await asyncio.create_subprocess_exec(*command, env=environ, stdout=subprocess.DEVNULL, stderr=log)
    try:
        status, checks = await wait_until(lambda: _ready(port, True), timeout=120, what="the worker ready")
        assert checks == {"ready": True, "broker": True, "database": True}
        await wait_until(lambda: _confirmed(port), timeout=120, what="events confirmed")
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(worker.wait(), timeout=120)
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]


async def _confirmed(port: int) -> bool:
    return value(await metrics(port), "sntrack_publisher_events_total", outcome="confirmed") > 0
