"""The real servers restarted mid-stream: RabbitMQ (stop_app/start_app) and PostgreSQL (pg_ctlcluster).

These restart the machine's shared services, so they run on their own after the parallel suite
(`make test` runs `-m restarts` serially) and are skipped where the control commands are not available.
"""

import asyncio
import os
import shutil
import subprocess

import pytest

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from tests.conftest import wait_until

pytestmark = pytest.mark.restarts


def _control(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def _postgres_cluster() -> list[str]:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return [versions[-1], "main"] if versions else []


async def _stream_through_restart(env, restart) -> None:
    study = synthetic_study(150, 10, producer=producer_info(), seed=31)
    events = [e for trial in study for e in trial]
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        publisher = EventPublisher(env.settings.publisher()).start()
        try:
            for i, event in enumerate(events):
                publisher.publish(event)
                if i == len(events) // 3:
                    await asyncio.to_thread(restart)
                elif i % 50 == 0:
                    await asyncio.sleep(0.01)  # a stream, not one burst
            assert await asyncio.to_thread(publisher.drain, 120), "events neither confirmed nor delivered from spool"
        finally:
            await asyncio.to_thread(publisher.close, 30)
        await wait_until(lambda: env.all_applied(("journal", "trials"), len(events)), timeout=120,
                         what="both projections to catch up after the restart")
    assert await env.fetchval("SELECT count(*) FROM events") == len(events)
    assert await env.fetchval("SELECT count(*) FROM trials") == len(study)
    live = await env.snapshot("trials", "trial_metrics")
    await env.replay("trials")
    assert await env.snapshot("trials", "trial_metrics") == live


@pytest.mark.skipif(shutil.which("rabbitmqctl") is None or os.geteuid() != 0, reason="needs rabbitmqctl as root")
async def test_rabbitmq_restart_mid_stream(env):
    def restart() -> None:
        _control("rabbitmqctl", "stop_app")
        _control("rabbitmqctl", "start_app")
        _control("rabbitmqctl", "await_startup")

    await _stream_through_restart(env, restart)


@pytest.mark.skipif(shutil.which("pg_ctlcluster") is None or not _postgres_cluster() or os.geteuid() != 0,
                    reason="needs pg_ctlcluster as root")
async def test_postgresql_restart_mid_stream(env):
    def restart() -> None:
        _control("pg_ctlcluster", "--skip-systemctl-redirect", *_postgres_cluster(), "restart")

    await _stream_through_restart(env, restart)
