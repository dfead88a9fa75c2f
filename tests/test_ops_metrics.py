"""`sntrack consume --metrics-port`: /metrics values move as events flow; /healthz follows the broker and the
database (cut and restored through fault proxies, the shared servers keep running)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.test_end_to_end import cli_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


async def healthz(port: int) -> tuple[int, dict]:
    status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/healthz")
    return status, json.loads(body) if body else {}


async def metrics(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample: (name, sorted label pairs) → value."""
    status, body = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _log_file(path):
    return open(path, "w")  # noqa: SIM115 - the caller closes it


def proxy_for(url: str) -> TcpProxy:
    parts = urlsplit(url)
    return TcpProxy(parts.hostname, parts.port)


async def test_metrics_move_as_events_flow_and_healthz_follows_broker_and_database(env, tmp_path):
    events = [e for t in synthetic_study(5, 3, producer=producer_info(), seed=8) for e in t]
    port = free_port()
    with proxy_for(env.settings.amqp_url) as broker, proxy_for(env.settings.database_url) as database:
        environ = {**cli_env(env), "SNTRACK_AMQP_URL": broker.url_for(env.settings.amqp_url),
                   "SNTRACK_DATABASE_URL": database.url_for(env.settings.database_url)}
        with _log_file(tmp_path / "daemon.log") as log:
            daemon = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sntrack", "consume", "journal", "trials", "--metrics-port", str(port),
                env=environ, stdout=subprocess.DEVNULL, stderr=log)
        try:
            await wait_until(lambda: _ready(port, True), timeout=60, what="ready")
            before = await metrics(port)
            assert value(before, "sntrack_ready") == 1
            assert value(before, "sntrack_consumer_events_total", consumer="trials", event_type="ml.run.metric",
                         outcome="applied") == 0

            # The trials projection is held up by a lock: the journal takes every event, trials lags by all.
            lock = await env.db()
            try:
                async with lock.transaction():
                    await lock.execute("LOCK TABLE trials IN ACCESS EXCLUSIVE MODE")
                    await env.publish_events(events)
                    await wait_until(lambda: _applied(port, "journal", len(events)), what="journal applied")
                    held = await metrics(port)
                    assert value(held, "sntrack_journal_head_position") >= len(events)
                    assert value(held, "sntrack_consumer_lag_events", consumer="journal") == 0
                    assert value(held, "sntrack_consumer_lag_events", consumer="trials") == len(events)
            finally:
                await lock.close()
            await wait_until(lambda: _applied(port, "trials", len(events)), what="trials applied")
            after = await metrics(port)
            assert value(after, "sntrack_consumer_lag_events", consumer="trials") == 0
            assert value(after, "sntrack_consumer_position", consumer="trials") == value(
                after, "sntrack_journal_head_position")
            assert value(after, "sntrack_consumer_batch_size_sum", consumer="trials") == len(events)
            assert value(after, "sntrack_consumer_handler_seconds_count", consumer="trials") >= 1
            assert value(after, "sntrack_consumer_events_total", consumer="trials", event_type="ml.run.stop",
                         outcome="applied") == 5

            await env.publish_raw([b"{not json"])
            await wait_until(lambda: _sample(port, "sntrack_dead_letter_messages", 1, queue="sntrack.trials"),
                             what="the dead letter counted")
            dead = await metrics(port)
            assert value(dead, "sntrack_consumer_dead_letters_total", consumer="trials", reason="invalid_json") == 1
            assert value(dead, "sntrack_consumer_events_total", consumer="trials", event_type="invalid",
                         outcome="dead_lettered") == 1

            broker.cut()
            status, checks = await wait_until(lambda: _ready(port, False), timeout=30, what="unready, broker away")
            assert status == 503 and checks["broker"] is False and checks["database"] is True
            broker.restore()
            await wait_until(lambda: _ready(port, True), timeout=60, what="ready, broker back")

            database.cut()
            status, checks = await wait_until(lambda: _ready(port, False), timeout=30, what="unready, database away")
            assert checks["database"] is False and checks["broker"] is True
            database.restore()
            await wait_until(lambda: _ready(port, True), timeout=60, what="ready, database back")
        finally:
            if daemon.returncode is None:
                daemon.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(daemon.wait(), timeout=60)
    assert code == 0, (tmp_path / "daemon.log").read_text()[-3000:]


async def _ready(port: int, want: bool):
    status, checks = await healthz(port)
    return (status, checks) if status and checks.get("ready") is want and (status == 200) is want else None


async def _applied(port: int, consumer: str, n: int) -> bool:
    samples = await metrics(port)
    return sum(v for (name, labels), v in samples.items() if name == "sntrack_consumer_events_total"
               and ("consumer", consumer) in labels and ("outcome", "applied") in labels) == n


async def _sample(port: int, name: str, want: float, **labels: str) -> bool:
    return value(await metrics(port), name, **labels) == want


def test_a_port_in_use_is_one_line(env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "sntrack", "consume", "journal", "--metrics-port", str(port)],
                             env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip() == (f"sntrack: cannot serve /healthz and /metrics on 127.0.0.1:{port} (the port is in "
                                  "use); choose another --metrics-port, or 0 to turn them off")
