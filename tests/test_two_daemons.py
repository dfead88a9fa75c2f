"""Two copies of the same daemon on one vhost and database, one of them killed -9 mid-stream and restarted:
every event applied exactly once per projection, and the live read model equals a fresh replay. And scale-out
(README, "Growing past one machine"): two replicas of the `trials` consumer competing on its one queue under a
flood, both doing part of the work, give the projection a replay gives."""

import asyncio
import json
import signal

from consumers.persistence import TRIAL_LOCK_CLASS, apply_events
from consumers.projections.sn_comparison import OVERALL
from consumers.registry import PROJECTIONS
from consumers.replay import _use as use_schemas
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import RunStopped
from tests.conftest import wait_until
from tests.test_comparison import SN_ROWS
from tests.test_crash_recovery import start_daemon

NAMES = ("journal", "trials", "comparison")


async def test_two_daemons_one_killed_apply_every_event_once(env):
    studies = [synthetic_study(125, 20, seed=31, producer=producer_info(), paired=True),
               synthetic_study(125, 20, seed=32, producer=producer_info())]
    events = [e for study in studies for trial in study for e in trial]
    assert len(events) >= 5_000
    stops = sum(isinstance(e, RunStopped) for e in events)
    metrics = sum(e.event_type == "ml.run.metric" for e in events)
    daemons = [start_daemon(env, *NAMES), start_daemon(env, *NAMES)]
    try:
        publishing = asyncio.create_task(env.publish_events(events, duplicates=500))
        await wait_until(lambda: env.fetchval("SELECT count(*) > 1000 FROM applied_events"), interval=0.02,
                         timeout=120, what="both daemons to be applying")
        daemons[0].send_signal(signal.SIGKILL)
        daemons[0].wait()
        applied_at_kill = await env.fetchval("SELECT count(*) FROM applied_events")
        daemons[0] = start_daemon(env, *NAMES)
        # Both daemons consume again: the SIGTERM at the end then stops two running daemons, not one mid-start.
        for name in NAMES:
            await wait_until(lambda q=f"sntrack.{name}": env.consumers(q) == 2, timeout=60,
                             what=f"two consumers on sntrack.{name}")
        await publishing
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), timeout=240,
                         what="journal to catch up")  # it keeps no applied_events rows: its UNIQUE event_id dedupes it
        for name, expected in (("trials", len(events)), ("comparison", stops)):
            await wait_until(lambda n=name, x=expected: env.fetchval(
                "SELECT count(*) = $2 FROM applied_events WHERE projection = $1", n, x), timeout=240,
                what=f"{name} to catch up")
    finally:
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        outcomes = [daemon.communicate(timeout=60) for daemon in daemons]
    for daemon, (_, stderr) in zip(daemons, outcomes, strict=True):
        assert daemon.returncode == 0, stderr[-2000:]

    # The kill hit a stream in motion, not an idle or finished pair of consumers.
    assert 1000 < applied_at_kill < len(events) + stops, applied_at_kill
    assert await env.fetchval("SELECT count(*) FROM events") == len(events)
    assert await env.fetchval("SELECT count(DISTINCT event_id) FROM events") == len(events)
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == metrics
    overall = await env.fetchval("SELECT sum(trials) FROM sn_comparison WHERE model_run_id = $1", OVERALL)
    assert overall == stops
    for queue in ("journal", "trials", "comparison"):
        assert env.queue_depth(f"sntrack.{queue}.dlq") == 0

    await assert_live_equals_replay(env)


def handled(stderr: str, consumer: str) -> int:
    """Messages a daemon's `consumer` handled, from its JSON "consumer stopped" line."""
    for line in stderr.splitlines():
        record = json.loads(line) if line.startswith("{") else {}
        if record.get("event") == "consumer stopped" and record.get("consumer") == consumer:
            return record["handled"]
    raise AssertionError(f"no 'consumer stopped' line for {consumer}: {stderr[-2000:]}")


async def test_two_replicas_of_the_trials_consumer_on_one_queue_under_a_flood_equal_a_replay(env):
    study = synthetic_study(300, 20, seed=33, producer=producer_info(), paired=True)
    events = [e for trial in study for e in trial]
    assert len(events) >= 6_000
    journal = start_daemon(env, "journal")
    replicas = [start_daemon(env, "trials"), start_daemon(env, "trials")]
    try:  # both replicas consume before the flood starts: it is shared between them from its first message
        await wait_until(lambda: env.consumers("sntrack.trials") == 2, timeout=60, what="two trials replicas")
        await env.publish_events(events, duplicates=500)
        for name in ("journal", "trials"):
            await wait_until(lambda n=name: env.has_applied(n, len(events)), timeout=240, what=f"{name} to catch up")
    finally:
        for daemon in (journal, *replicas):
            daemon.send_signal(signal.SIGTERM)
        outcomes = [daemon.communicate(timeout=60) for daemon in (journal, *replicas)]
    for daemon, (_, stderr) in zip((journal, *replicas), outcomes, strict=True):
        assert daemon.returncode == 0, stderr[-2000:]
    shares = [handled(stderr, "trials") for _, stderr in outcomes[1:]]
    assert all(share > 0 for share in shares), shares  # competing consumers: each replica did part of the flood
    # Every event handled by one of them (duplicates still queued when both caught up may be left unhandled).
    assert sum(shares) >= len(events), shares
    assert env.queue_depth("sntrack.trials.dlq") == 0

    live = await env.snapshot("trials", "trial_metrics")
    await env.replay("trials")
    assert await env.snapshot("trials", "trial_metrics") == live
    assert await env.fetchval("SELECT count(*) FROM trials") == len(study)


async def assert_live_equals_replay(env) -> None:
    """`trials`, `trial_metrics` and the comparison rows equal a fresh replay of the journal."""
    live = await env.snapshot("trials", "trial_metrics")
    live_comparison = [tuple(r) for r in await env.fetch(SN_ROWS)]
    await env.replay("trials")
    await env.replay("comparison")
    assert await env.snapshot("trials", "trial_metrics") == live
    assert [tuple(r) for r in await env.fetch(SN_ROWS)] == live_comparison


async def test_a_batch_locks_its_trials_but_not_while_a_replay_writes_its_shadow(env):
    """The trials projection's per-trial locks serialize live writers; a replay writing its shadow tables, their
    only writer, takes none, so it never waits for, nor deadlocks with, the live daemons over a trial."""
    held = ("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
            "AND classid = $1::bigint::oid")
    study = synthetic_study(3, 2, seed=4, producer=producer_info(), model_run_id="locks")
    conn = await env.db()
    try:
        async with conn.transaction():
            await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
            live = await conn.fetchval(held, TRIAL_LOCK_CLASS)
        async with conn.transaction():
            await use_schemas(conn, "sntrack_rebuild_trials", "public")  # no such schema: the tables are public's
            await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
            shadow = await conn.fetchval(held, TRIAL_LOCK_CLASS)
    finally:
        await conn.close()
    assert (live, shadow) == (3, 0)
