"""Restarts age nothing; a message that kills the process is dead-lettered by the runtime with a reason.

RabbitMQ 3.10 counts a delivery for every unacked message of a channel that closes, so the broker cannot tell a
crash from a restart. The runtime's attempt ledger (consumers/attempts.py) can: these tests prove both sides.
"""

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from consumers.runtime import CRASH_ATTEMPTS, CRASHED
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import REASON_HEADER
from tests.conftest import wait_until
from tests.crashing_daemon import CRASH_EXIT
from tests.faults import TcpProxy
from tests.test_end_to_end import cli_env


async def test_a_message_that_kills_the_process_is_dead_lettered_and_its_neighbours_applied(env, tmp_path):
    study = synthetic_study(40, 5, producer=producer_info(), seed=31)
    events = [e for trial in study for e in trial]
    poison = events[len(events) // 2]
    await env.publish_events(events)  # one backlog: the poison shares its batch with all its neighbours
    crashes = 0
    while True:
        daemon = _start_crashing_daemon(env, str(poison.event_id), tmp_path / f"daemon-{crashes}.log")
        try:
            code = await asyncio.to_thread(daemon.wait, 30)
        except subprocess.TimeoutExpired:
            break  # it stayed up: the poison is out of its way
        assert code == CRASH_EXIT, (tmp_path / f"daemon-{crashes}.log").read_text()[-2000:]
        crashes += 1
        assert crashes <= 2 * CRASH_ATTEMPTS + 1, "the crash loop was not broken"
    try:
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events) - 1), timeout=60,
                         what=f"every neighbour in the journal (after {crashes} crashes)")
        await wait_until(lambda: env.queue_depth("sntrack.journal.dlq") == 1, timeout=30, what="the dead letter")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    assert daemon.returncode == 0, (tmp_path / f"daemon-{crashes}.log").read_text()[-2000:]
    # First delivery, then CRASH_ATTEMPTS in its batch, then CRASH_ATTEMPTS alone.
    assert crashes == 2 * CRASH_ATTEMPTS + 1
    letters = await env.dead_letters("sntrack.journal")
    assert [json.loads(m.body)["event_id"] for m in letters] == [str(poison.event_id)]
    assert letters[0].headers[REASON_HEADER] == CRASHED
    assert "died" in letters[0].headers["x-sntrack-detail"]
    assert await env.fetchval("SELECT count(*) FROM events WHERE event_id = $1", poison.event_id) == 0
    assert await env.fetchval("SELECT count(*) FROM consumer_attempts") == 0


async def test_25_restarts_and_reconnects_during_a_backlog_dead_letter_nothing(env):
    study = synthetic_study(300, 18, producer=producer_info(), seed=32)
    events = [e for trial in study for e in trial]
    await env.publish_events(events)
    restarts = reconnects = 0
    # Each daemon gets its prefetch window (512 messages), then stalls on its first batch of 5: the test holds a
    # lock on applied_events. While it stalls it is stopped (SIGTERM) and, every fifth time, its connection is cut
    # too. The broker counts a delivery for the whole window each time; the head of the backlog is in every window.
    amqp = urlsplit(env.settings.amqp_url)
    with TcpProxy(amqp.hostname, amqp.port) as broker:
        env.settings = env.settings.replace(amqp_url=broker.url_for(env.settings.amqp_url))
        for round_ in range(25):
            blocker = await env.db()
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE applied_events IN SHARE MODE")
            daemon = start_daemon_with(env, {"SNTRACK_BATCH_SIZE": "5"})
            await wait_until(lambda: env.fetchval(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                env.database), timeout=60, what="the daemon to stall on its first batch")
            if round_ % 5 == 4:  # a lost connection: the client reconnects by itself
                connections = broker.connections
                broker.cut()
                broker.restore()
                await wait_until(lambda c=connections: broker.connections > c, what="the reconnect")
                reconnects += 1
            daemon.send_signal(signal.SIGTERM)
            await lock.rollback()
            await blocker.close()
            await asyncio.to_thread(daemon.wait, 30)
            assert daemon.returncode == 0
            restarts += 1
        backlog = len(events) - await env.fetchval("SELECT count(*) FROM events")
        daemon = start_daemon_with(env, {})
        try:
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), timeout=120,
                             what="the journal to catch up (a dead-lettered event never does)")
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
    assert restarts == 25 and reconnects == 5 and backlog > 0  # every restart hit a backlog
    await wait_until(lambda: env.queue_depth("sntrack.journal") == 0, timeout=30, what="the queue to drain")
    assert env.queue_depth("sntrack.journal.dlq") == 0
    assert await env.fetchval("SELECT count(DISTINCT event_id) FROM events") == len(events)
    assert await env.fetchval("SELECT count(*) FROM consumer_attempts") == 0


def _start_crashing_daemon(env, event_id: str, log: Path) -> subprocess.Popen:
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "tests.crashing_daemon", event_id],
                                env={**cli_env(env), "SNTRACK_LOG_JSON": "true"}, stdout=subprocess.DEVNULL,
                                stderr=stderr)


def start_daemon_with(env, extra: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "consume", "journal"],
                            env={**cli_env(env), "SNTRACK_LOG_JSON": "true", **extra},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
