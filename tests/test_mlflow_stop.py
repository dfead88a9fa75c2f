"""A graceful stop of `sntrack consume mlflow` in the middle of a large backlog (issue 12): the daemon finishes the
calls in flight and exits within a bound, leaving the rest unacked; a restart syncs the rest, and every trial ends
with exactly one run, synced, nothing dead-lettered."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.mlflow_server import mlflow_server, mlflow_settings  # noqa: F401
from tests.test_end_to_end import cli_env
from tests.test_mlflow_identity import finished_runs, runs_per_trial

# A correctness bound, not a benchmark: a daemon that finished its whole batch first would need tens of seconds
# behind the slow server below.
STOP_BOUND_S = 10.0


def consume_mlflow(env, settings) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "consume", "mlflow"],
                            env={**cli_env(env), **settings.to_env(), "SNTRACK_LOG_JSON": "true"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def test_sigterm_with_a_backlog_exits_within_a_bound_and_loses_nothing(env, mlflow_server):  # noqa: F811
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(200, 1, seed=81, producer=producer_info())  # 600 events: the batch in hand is full
    name = study[0][0].model_run_id
    events = [e for trial in study for e in trial]
    await env.publish_events(events)
    host, port = mlflow_server.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        proxy.delay_s = 0.3  # per answer: a batch's calls take far longer than the bound, one round of them does not
        proxied = settings.replace(mlflow_tracking_uri=proxy.url_for(mlflow_server))
        daemon = consume_mlflow(env, proxied)
        try:
            # The first batch is whatever had arrived when the daemon started; the next one is full (≥ 100 events).
            await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM applied_events"), timeout=60,
                             interval=0.05, what="the daemon's first batch")
            await asyncio.sleep(0.5)  # the next batch's calls in flight
            daemon.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            _, stderr = await asyncio.to_thread(daemon.communicate, timeout=60)
            stop_s = time.monotonic() - signalled
        finally:
            if daemon.poll() is None:
                daemon.kill()
    assert daemon.returncode == 0, stderr[-2000:]
    assert stop_s < STOP_BOUND_S, f"stopped {stop_s:.1f} s after SIGTERM"
    synced_before = await env.fetchval("SELECT count(*) FROM applied_events WHERE projection = 'mlflow'")
    assert synced_before < len(events), "the backlog was drained before the stop: nothing tested"

    async with running_consumers(settings.consumer(), ["mlflow"]):
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = 'mlflow'",
                                              len(events)), timeout=180, interval=0.5, what="the rest synced")
    await finished_runs(settings, name, len(study))
    assert runs_per_trial(settings, name) == Counter({trial[0].trial_id: 1 for trial in study})
    links = await env.fetch("SELECT trial_id, status FROM mlflow_runs")
    assert {r["trial_id"]: r["status"] for r in links} == {t[-1].trial_id: t[-1].payload.status for t in study}
    assert await env.dead_letters("sntrack.mlflow") == []
