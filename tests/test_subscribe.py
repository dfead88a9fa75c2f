"""An extra subscriber added later gets its own queue and sees the events matching its pattern."""

import asyncio
import json
import signal
import sys

from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env


async def test_subscriber_prints_matching_events_and_keeps_its_queue(env):
    study = synthetic_study(6, 3, producer=producer_info(), seed=8)
    stops = [trial[-1] for trial in study]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sntrack", "subscribe", "stops", "--pattern", "ml.run.stop",
        env={**cli_env(env), "SNTRACK_LOG_JSON": "true"}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/sntrack.sub.stops") or {})
                         .get("consumers"), what="the subscriber's queue to have a consumer")
        await env.publish_events([e for trial in study for e in trial])
        await env.publish_raw([b"not json"], routing_key="ml.run.stop")
        lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), 30)) for _ in stops]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert sorted(line["event_id"] for line in lines) == sorted(str(e.event_id) for e in stops)
    assert all(line["event_type"] == "ml.run.stop" for line in lines)
    letters = await wait_until(lambda: env.dead_letters("sntrack.sub.stops"), what="the garbage's dead letter")
    assert [m.body for m in letters] == [b"not json"]


def test_bad_subscriber_name_is_one_line(env):
    import subprocess

    run = subprocess.run([sys.executable, "-m", "sntrack", "subscribe", "Bad Name!"], env=cli_env(env),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "subscriber name" in run.stderr
