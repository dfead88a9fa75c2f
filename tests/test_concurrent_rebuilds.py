"""Two `sntrack replay` of the same projection at once, beside a live daemon under a stream: each either
succeeds or refuses in one line with a non-zero exit; never a deadlock or a half swap. Afterwards the
projection equals a fresh replay."""

import asyncio
import signal
import subprocess
import sys

from consumers.projections.sn_comparison import OVERALL
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import RunStopped
from tests.conftest import wait_until
from tests.test_crash_recovery import start_daemon
from tests.test_end_to_end import cli_env
from tests.test_two_daemons import assert_live_equals_replay

NAMES = ("journal", "trials", "comparison")


def _replay(env, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sntrack", "replay", name], env=cli_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def test_two_rebuilds_of_each_projection_at_once_beside_a_live_daemon(env):
    first = synthetic_study(60, 20, seed=41, producer=producer_info(), paired=True)
    second = synthetic_study(60, 20, seed=42, producer=producer_info())
    events = [e for study in (first, second) for trial in study for e in trial]
    stops = sum(isinstance(e, RunStopped) for e in events)
    daemon = start_daemon(env, *NAMES)
    try:
        await env.publish_events([e for trial in first for e in trial])
        await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM trials"), timeout=120, what="live trials")
        publishing = asyncio.create_task(env.publish_events([e for trial in second for e in trial], duplicates=200))
        rebuilds = [_replay(env, name) for name in ("trials", "comparison", "trials", "comparison")]
        outcomes = [await asyncio.to_thread(p.communicate, timeout=240) for p in rebuilds]
        await publishing
        for name in ("journal", "trials"):
            await wait_until(lambda n=name: env.has_applied(n, len(events)), timeout=240,
                what=f"{name} to catch up")
        # A rebuild records every journal event as applied by comparison, the live consumer only the stops.
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events a JOIN events e USING (event_id) "
            "WHERE a.projection = 'comparison' AND e.event_type = 'ml.run.stop'", stops), timeout=240,
            what="comparison to catch up")
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr[-2000:]
    for p, (_, err) in zip(rebuilds, outcomes, strict=True):
        if p.returncode != 0:
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-2000:]
    assert any(p.returncode == 0 for p in rebuilds[0::2]) and any(p.returncode == 0 for p in rebuilds[1::2])
    assert await env.fetchval("SELECT sum(trials) FROM sn_comparison WHERE model_run_id = $1", OVERALL) == stops
    assert await env.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'sntrack_%'") == 0

    await assert_live_equals_replay(env)
