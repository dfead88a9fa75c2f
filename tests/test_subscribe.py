"""An extra subscriber added later gets its own queue and sees the events matching its pattern."""

import asyncio
import json
import signal
import sys
from dataclasses import replace

import aio_pika

from consumers.service import running_consumers
from consumers.topology import subscriber_queue
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE, ROUTING_PATTERN_ALL
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env


async def test_subscriber_prints_matching_events_and_keeps_its_queue(env):
    # As the subscriber role, which may configure, bind and read only sntrack.sub.* queues (tests/test_topology.py).
    study = synthetic_study(6, 3, producer=producer_info(), seed=8)
    stops = [trial[-1] for trial in study]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sntrack", "subscribe", "stops", "--pattern", "ml.run.stop",
        env={**cli_env(env), "SNTRACK_AMQP_URL": env.roles["subscriber"], "SNTRACK_LOG_JSON": "true"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/sntrack.sub.stops") or {})
                         .get("consumers"), what="the subscriber's queue to have a consumer")
        await env.publish_events([e for trial in study for e in trial])
        await env.publish_raw([b"not json"], routing_key="ml.run.stop")
        lines = [json.loads(await asyncio.wait_for(process.stdout.readline(), 30)) for _ in stops]
        # Before the stop: the garbage, published last, may not be handled yet when the last stop is printed, and what
        # a stopped subscriber has not handled goes back to its queue, not to the dead letters.
        letters = await wait_until(lambda: env.dead_letters("sntrack.sub.stops"), what="the garbage's dead letter")
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert sorted(line["event_id"] for line in lines) == sorted(str(e.event_id) for e in stops)
    assert all(line["event_type"] == "ml.run.stop" for line in lines)
    assert [m.body for m in letters] == [b"not json"]


def test_bad_subscriber_name_is_one_line(env):
    import subprocess

    run = subprocess.run([sys.executable, "-m", "sntrack", "subscribe", "Bad Name!"], env=cli_env(env),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "subscriber name" in run.stderr


async def test_an_overflowing_subscriber_queue_drops_its_oldest_and_the_journal_keeps_them(env):
    # The shape of every sntrack.sub.* queue (consumers.topology.subscriber_queue), with a bound of 3 to reach it.
    spec = replace(subscriber_queue("tiny", (ROUTING_PATTERN_ALL,)), max_length=3)
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        await queue.bind(EXCHANGE, routing_key=ROUTING_PATTERN_ALL)
        dlq = await channel.declare_queue(spec.dead_letter_queue, durable=True, arguments=spec.dead_letter_arguments)
        await dlq.bind(DEAD_LETTER_EXCHANGE, routing_key=spec.name)
        events = [e for trial in synthetic_study(2, 3, producer=producer_info(), seed=9) for e in trial]
        async with running_consumers(env.settings.consumer(), ["journal"]):
            for event in events:  # one by one, so that "oldest" is well defined
                await env.publish_events([event])
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")
        kept = [json.loads((await queue.get(timeout=5)).body)["event_id"] for _ in range(3)]
        assert await queue.get(fail=False, timeout=5) is None
        dropped = []
        while (message := await dlq.get(fail=False, timeout=5)) is not None:
            assert message.headers["x-first-death-reason"] == "maxlen"
            dropped.append(json.loads(message.body)["event_id"])
    finally:
        await connection.close()
    assert kept == [str(e.event_id) for e in events[-3:]]
    assert dropped == [str(e.event_id) for e in events[:-3]]
    # What the subscriber missed is in the journal, in order: the documented way to catch up.
    journal = await env.fetch("SELECT event_id::text FROM events ORDER BY position")
    assert [r["event_id"] for r in journal] == [str(e.event_id) for e in events]
