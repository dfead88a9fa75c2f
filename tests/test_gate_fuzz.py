"""Fuzzing the gate (issue 8): malformed messages never escape parse_event, and never stop the consumer daemon.

The pure tests let hypothesis drive the mutation engine of tests/fuzzing.py; the daemon test publishes 10,000 of
its refused messages, interleaved with a real study, through the real broker to `sntrack consume journal trials
comparison`, and checks that every one is dead-lettered with a reason while every good event is applied.
"""

import asyncio
import collections
import hashlib
import json
import random
import signal
import subprocess
import sys

import aio_pika
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import GateRejection, RejectReason, parse_event
from schemas.topology import REASON_HEADER, ROUTING_KEYS, RUN_STOP
from tests.conftest import wait_until
from tests.fuzzing import malformed
from tests.test_contract import METRIC, START, STOP
from tests.test_end_to_end import cli_env

LIMIT = 16 * 1024  # the daemon's max_message_bytes here: huge strings reach just past it cheaply
BAD_MESSAGES = 10_000


def refused(body: bytes) -> GateRejection | None:
    try:
        parse_event(body, max_bytes=LIMIT)
    except GateRejection as rejection:
        assert rejection.reason in RejectReason and rejection.detail
        return rejection
    return None


@settings(max_examples=1500, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.randoms(use_true_random=False))
def test_parse_event_is_total_on_mutated_events(rng):
    refused(malformed(rng, [START, METRIC, STOP], LIMIT))


@settings(max_examples=1500, derandomize=True, deadline=None)
@given(st.binary(max_size=2000) | st.text(max_size=500).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_parse_event_is_total_on_arbitrary_bytes(body):
    refused(body)


def fuzz_set(documents: list[dict], count: int, seed: int) -> list[tuple[bytes, str]]:
    """`count` (body, routing key) pairs the gate refuses, drawn deterministically from `seed`."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        body = malformed(rng, documents, LIMIT)
        if refused(body):
            out.append((body, rng.choice(ROUTING_KEYS)))
    return out


async def queue_depths(env, *queues: str) -> dict[str, int]:
    """Ready messages per queue, exactly (a passive declare, not the management API's sampled figure)."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        return {q: (await channel.declare_queue(q, passive=True)).declaration_result.message_count for q in queues}
    finally:
        await connection.close()


async def drain(env, queue: str, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take exactly `count` messages off `queue` (consumed in bulk: basic.get one by one is too slow here)."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    out = []
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        source = await channel.get_queue(queue, ensure=False)
        async with source.iterator() as messages:
            async for message in messages:
                await message.ack()
                out.append(message)
                if len(out) == count:
                    break
    finally:
        await connection.close()
    return out


def start_daemon(env, log, *names: str) -> subprocess.Popen:
    """The real consumer daemon; its log goes to a file (30,000 dead-letter warnings would fill a pipe)."""
    return subprocess.Popen(
        [sys.executable, "-m", "sntrack", "consume", *names],
        env={**cli_env(env), "SNTRACK_MAX_MESSAGE_BYTES": str(LIMIT), "SNTRACK_LOG_JSON": "true"},
        stdout=subprocess.DEVNULL, stderr=log)


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def test_the_messages_that_killed_the_daemon_are_dead_lettered(env, tmp_path):
    # Issue 8's reproductions: 1,000 nested [ (RecursionError) and an offset that overflows UTC (OverflowError)
    # each killed `sntrack consume journal trials`, and killed it again on every redelivery.
    study = synthetic_study(10, 4, producer=producer_info(), seed=8)
    good = [e for trial in study for e in trial]
    date = json.loads(next(e for e in good if e.event_type == "ml.run.metric").to_json())
    date["occurred_at"] = "0001-01-01T00:00:00+01:00"
    poison = [b"[" * 1000 + b"]" * 1000, json.dumps(date).encode()]
    with (tmp_path / "daemon.log").open("w") as log:
        daemon = start_daemon(env, log, "journal", "trials")
        try:
            await env.publish_events(good[:20])
            await env.publish_raw(poison)
            await env.publish_events(good[20:])
            for projection in ("journal", "trials"):
                await wait_until(lambda p=projection: env.has_applied(p, len(good)), what=projection)
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()[-2000:]
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=60)
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-2000:]
    for queue in ("sntrack.journal", "sntrack.trials"):
        letters = await drain(env, f"{queue}.dlq", 2)
        assert [(m.body, m.headers[REASON_HEADER]) for m in letters] == [
            (poison[0], "invalid_json"), (poison[1], "invalid_event")], queue


@pytest.mark.slow
async def test_ten_thousand_malformed_messages_through_the_daemon(env, tmp_path):
    study = synthetic_study(150, 8, producer=producer_info(), seed=31)
    good = [e for trial in study for e in trial]
    stops = sum(e.event_type == RUN_STOP for e in good)
    bad = fuzz_set([json.loads(e.to_json()) for e in good[:300]], BAD_MESSAGES, seed=2026)
    expected = {"journal": collections.Counter(digest(b) for b, _ in bad),
                "trials": collections.Counter(digest(b) for b, _ in bad),
                "comparison": collections.Counter(digest(b) for b, key in bad if key == RUN_STOP)}

    log = (tmp_path / "daemon.log").open("w")
    daemon = start_daemon(env, log, "journal", "trials", "comparison")

    def alive(value):
        assert daemon.poll() is None, f"the daemon died (exit {daemon.returncode}); see {log.name}"
        return value

    try:
        rounds = 10
        for n in range(rounds):
            await env.publish_events(good[n * len(good) // rounds:(n + 1) * len(good) // rounds])
            chunk = bad[n * len(bad) // rounds:(n + 1) * len(bad) // rounds]
            for key in ROUTING_KEYS:
                await env.publish_raw([b for b, k in chunk if k == key], routing_key=key)
            alive(True)
        dlqs = [f"sntrack.{name}.dlq" for name in expected]
        want = {f"sntrack.{name}.dlq": sum(c.values()) for name, c in expected.items()}

        async def all_dead_lettered() -> bool:
            return alive(await queue_depths(env, *dlqs) == want)

        await wait_until(all_dead_lettered, timeout=150, interval=1, what="every malformed message dead-lettered")
        for projection, count in (("journal", len(good)), ("trials", len(good)), ("comparison", stops)):
            await wait_until(lambda p=projection, n=count: env.has_applied(p, n), timeout=60,
                             what=f"{projection} to apply every good event")
        await asyncio.sleep(2)  # nothing more arrives: the counts are exact, not a passing moment
        assert await queue_depths(env, *dlqs) == want
        alive(True)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        log.close()
    assert daemon.returncode == 0, (tmp_path / "daemon.log").read_text()[-2000:]

    for name, bodies in expected.items():
        letters = await drain(env, f"sntrack.{name}.dlq", sum(bodies.values()))
        assert collections.Counter(digest(m.body) for m in letters) == bodies, name
        assert all(m.headers.get(REASON_HEADER) in set(RejectReason) for m in letters), name
    assert await env.fetchval("SELECT count(*) FROM events") == len(good)
    assert await env.fetchval("SELECT count(*) FROM trials") == len(study)

    for projection, tables in (("trials", ("trials", "trial_metrics")), ("comparison", ("sn_comparison",))):
        live = await env.snapshot(*tables)
        await env.replay(projection)
        assert await env.snapshot(*tables) == live, projection
