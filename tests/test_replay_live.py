"""Rebuilds beside live consumers (issue 8 item 4): shadow tables, a short swap, no lost effect, no deadlock."""

import asyncio
import json
import signal
import subprocess
import sys

import asyncpg
import pytest

from consumers.persistence import Store, apply_events
from consumers.registry import PROJECTIONS
from consumers.replay import ReplayAborted, _drop_retired, replay
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.test_crash_recovery import start_daemon
from tests.test_end_to_end import cli_env

TABLES = ("trials", "trial_metrics")


def study_events(trials: int, epochs: int, seed: int):
    study = synthetic_study(trials, epochs, producer=producer_info(), seed=seed)
    return study, [e for trial in study for e in trial]


async def apply(env, name: str, events) -> None:
    """Apply `events` through projection `name` exactly as its live consumer does (one batch per 2,000)."""
    pool = await asyncpg.create_pool(env.settings.database_url, min_size=1, max_size=1)
    try:
        for start in range(0, len(events), 2000):
            await Store(pool).apply(PROJECTIONS[name], events[start:start + 2000])
    finally:
        await pool.close()


async def run_replay(env, name: str, **options):
    pool = await asyncpg.create_pool(env.settings.database_url, min_size=2, max_size=2)
    try:
        return await replay(pool, PROJECTIONS[name], **options)
    finally:
        await pool.close()


async def leftover_schemas(env) -> list[str]:
    rows = await env.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'sntrack\\_%'")
    return [r["nspname"] for r in rows]


async def test_a_stop_applied_live_but_not_yet_journaled_survives_the_rebuild(env):
    study, events = study_events(20, 3, seed=11)
    stops = [trial[-1] for trial in study]
    await apply(env, "trials", events)  # the live trials consumer applied everything...
    await apply(env, "journal", [e for e in events if e.event_type != "ml.run.stop"])  # ...the journal lags
    assert await env.fetchval("SELECT count(*) FROM trials WHERE status <> 'running'") == len(stops)

    rebuild = asyncio.create_task(run_replay(env, "trials", journal_wait_s=60))
    await asyncio.sleep(1.0)
    assert not rebuild.done(), "the swap must wait for the journal to hold what the live projection applied"
    await apply(env, "journal", stops)  # the journal consumer catches up
    result = await rebuild

    assert result.events == len(events)
    rows = {r["id"]: r["status"] for r in await env.fetch("SELECT id, status FROM trials")}
    assert rows == {s.trial_id: s.payload.status for s in stops}
    assert await env.fetchval("SELECT count(*) FROM applied_events WHERE projection = 'trials'") == len(events)
    assert await leftover_schemas(env) == []


async def test_a_journal_that_never_catches_up_aborts_and_leaves_the_live_tables_untouched(env):
    study, events = study_events(10, 2, seed=12)
    await apply(env, "trials", events)
    await apply(env, "journal", [e for e in events if e.event_type != "ml.run.stop"])
    before = await env.snapshot(*TABLES, "applied_events")

    with pytest.raises(ReplayAborted, match="10 events .* not in the journal"):
        await run_replay(env, "trials", journal_wait_s=1)

    assert await env.snapshot(*TABLES, "applied_events") == before
    assert await leftover_schemas(env) == []


async def test_events_leaving_the_journal_during_the_rebuild_abort_the_swap(env):
    study, events = study_events(6, 2, seed=18)
    stops = [trial[-1] for trial in study]
    await apply(env, "trials", events)
    await apply(env, "journal", [e for e in events if e not in stops])
    rebuild = asyncio.create_task(run_replay(env, "trials", journal_wait_s=60))
    await asyncio.sleep(1.0)  # built; waiting for the journal to hold the stops
    gone = [e.event_id for e in study[0]]
    conn = await env.db()
    try:  # what `studies delete --hard` of the first trial does, as far as the rebuild can see
        async with conn.transaction():
            await conn.execute("ALTER TABLE events DISABLE TRIGGER events_no_update_delete")
            await conn.execute("DELETE FROM events WHERE event_id = ANY($1)", gone)
            await conn.execute("ALTER TABLE events ENABLE TRIGGER events_no_update_delete")
            await conn.execute("DELETE FROM applied_events WHERE event_id = ANY($1)", gone)
            await conn.execute("DELETE FROM trial_metrics WHERE trial_id = $1", study[0][0].trial_id)
            await conn.execute("DELETE FROM trials WHERE id = $1", study[0][0].trial_id)
    finally:
        await conn.close()
    before = await env.snapshot(*TABLES)
    await apply(env, "journal", stops[1:])
    with pytest.raises(ReplayAborted, match="left the journal"):
        await rebuild
    assert await env.snapshot(*TABLES) == before
    assert await leftover_schemas(env) == []


async def test_a_journal_event_committed_out_of_position_order_during_the_rebuild_is_not_missed(env):
    study, events = study_events(6, 2, seed=16)
    late_stop = study[0][-1]
    await apply(env, "journal", [e for e in events if e is not late_stop])
    await apply(env, "trials", [e for e in events if e is not late_stop])
    slow = await env.db()  # a journal transaction that takes its position first and commits last
    try:
        async with slow.transaction():
            await apply_events(slow, PROJECTIONS["journal"], [late_stop])
            later = study_events(1, 1, seed=17)[1]
            await apply(env, "journal", later)  # committed above the slow one's position
            rebuild = asyncio.create_task(run_replay(env, "trials"))
            await asyncio.sleep(1.5)
            assert not rebuild.done(), "the catch-up must wait for the transaction in flight at its fence"
        result = await rebuild
    finally:
        await slow.close()
    assert result.events == len(events) + len(later)
    assert await env.fetchval("SELECT status FROM trials WHERE id = $1", late_stop.trial_id) == \
        late_stop.payload.status


async def test_readers_with_a_400ms_statement_timeout_never_time_out_during_a_rebuild(env):
    _, events = study_events(1500, 20, seed=13)
    assert len(events) >= 30_000
    await apply(env, "journal", events)
    await apply(env, "trials", events)
    live = await env.snapshot(*TABLES)

    reader = await env.db()
    await reader.execute("SET statement_timeout = '400ms'")
    reads = 0
    rebuild = asyncio.create_task(run_replay(env, "trials"))
    try:
        while not rebuild.done():  # a read blocked past 400 ms raises QueryCanceledError
            assert await reader.fetchval("SELECT count(*) FROM trials") == 1500
            assert await reader.fetchval("SELECT count(*) FROM trial_metrics") > 0
            reads += 1
            await asyncio.sleep(0.005)
        result = await rebuild
    finally:
        await reader.close()
    print(f"rebuild of {result.events} events: {result.events_per_s:,.0f} events/s, "
          f"swap held the locks {result.swap_seconds * 1000:.1f} ms; {reads} reads, none timed out")
    assert reads >= 10
    assert await env.snapshot(*TABLES) == live


async def test_the_swap_keeps_indexes_views_and_grants(env):
    _, events = study_events(5, 2, seed=14)
    await apply(env, "journal", events)
    await apply(env, "trials", events)
    conn = await env.db()
    try:
        await conn.execute("DROP ROLE IF EXISTS sntrack_test_reader")
        await conn.execute("CREATE ROLE sntrack_test_reader")
        await conn.execute("GRANT SELECT ON trials TO sntrack_test_reader")
        indexes = "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY($1) ORDER BY 1"
        before = await conn.fetch(indexes, list(TABLES))
        await run_replay(env, "trials")
        assert await conn.fetch(indexes, list(TABLES)) == before
        assert await conn.fetchval("SELECT count(*) FROM trial_mlflow_runs") == 5  # the view follows the swap
        assert await conn.fetchval("SELECT has_table_privilege('sntrack_test_reader', 'trials', 'SELECT')")
    finally:
        await conn.execute("DROP OWNED BY sntrack_test_reader")
        await conn.execute("DROP ROLE sntrack_test_reader")
        await conn.close()


async def test_until_writes_a_past_state_into_another_schema_and_never_touches_the_live_tables(env):
    study, events = study_events(10, 3, seed=4)
    await apply(env, "journal", events)
    await apply(env, "trials", events)
    live = await env.snapshot(*TABLES, "applied_events")
    cutoff = study[4][-1].occurred_at  # the fifth trial's stop: later trials had not started
    expected = {e.event_id for e in events if e.occurred_at <= cutoff}

    run = subprocess.run([sys.executable, "-m", "sntrack", "replay", "trials", "--until", cutoff.isoformat(),
                          "--into", "asof_test"], env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "schema asof_test" in run.stderr and "events/s" in run.stderr
    assert await env.snapshot(*TABLES, "applied_events") == live
    assert await env.fetchval("SELECT count(*) FROM asof_test.trials") == 5
    assert {r["event_id"] for r in await env.fetch("SELECT event_id FROM asof_test.applied_events")} == expected
    assert await env.fetchval("SELECT count(*) FROM asof_test.trial_metrics") == sum(
        e.event_type == "ml.run.metric" for e in events if e.event_id in expected)

    run = subprocess.run([sys.executable, "-m", "sntrack", "replay", "trials", "--until", "2026-11-25T12:00:00Z"],
                         env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "schema asof_20261125_120000" in run.stderr
    again = subprocess.run([sys.executable, "-m", "sntrack", "replay", "trials", "--until", "2026-11-25T12:00:00Z"],
                           env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "asof_20261125_120000 already exists" in again.stderr
    assert await env.snapshot(*TABLES, "applied_events") == live


def test_into_needs_until_and_a_plain_name(env):
    for args, message in ((["--into", "x"], "--into needs --until"),
                          (["--until", "2026-11-25T12:00:00Z", "--into", "public"], "not a schema name"),
                          (["--until", "2026-11-25T12:00:00Z", "--into", "Bad-Name"], "not a schema name")):
        run = subprocess.run([sys.executable, "-m", "sntrack", "replay", "trials", *args], env=cli_env(env),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, run.stderr


@pytest.mark.slow
async def test_rebuilds_beside_the_live_daemon_never_deadlock_lose_or_double(env):
    study, events = study_events(600, 15, seed=15)
    stops = [trial[-1] for trial in study]
    daemon = start_daemon(env, "journal", "trials", "comparison")
    publishing = asyncio.create_task(env.publish_events(events, duplicates=300))
    rebuilds = []
    try:
        await wait_until(lambda: env.fetchval("SELECT count(*) > 500 FROM applied_events WHERE projection = 'trials'"),
                         timeout=60, what="the daemon to apply")
        while not publishing.done() or not rebuilds:
            for name in ("trials", "comparison"):
                rebuilds.append(await run_replay(env, name, journal_wait_s=60))
        await publishing
        for name in ("journal", "trials"):
            await wait_until(lambda n=name: env.has_applied(n, len(events)), timeout=180, what=f"{name} to catch up")
        # The live comparison consumer records the stops it receives, a rebuild every journal event it read: count
        # the stops, which both record.
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events a JOIN events e USING (event_id) "
            "WHERE a.projection = 'comparison' AND e.event_type = 'ml.run.stop'", len(stops)),
            timeout=180, what="comparison to catch up")
        rebuilds.append(await run_replay(env, "trials"))  # one more with the daemon idle but running
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=30)
    assert daemon.returncode == 0, stderr[-2000:]
    assert '"handler_error"' not in stderr and "dead-letter" not in stderr.lower(), stderr[-2000:]
    print(f"{len(rebuilds)} rebuilds beside the live daemon; swaps held the locks "
          f"{max(r.swap_seconds for r in rebuilds) * 1000:.1f} ms at most")
    assert len(rebuilds) >= 3
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == sum(
        e.event_type == "ml.run.metric" for e in events)
    assert await env.fetchval("SELECT count(*) FROM trials WHERE status <> 'running'") == len(stops)
    assert await env.fetchval("SELECT sum(trials) FROM sn_comparison") == 2 * len(stops)  # no stop counted twice
    live = await env.snapshot(*TABLES, "sn_comparison")
    await env.replay("trials")
    await env.replay("comparison")
    assert await env.snapshot(*TABLES, "sn_comparison") == live
    assert env.queue_depth("sntrack.trials.dlq") == 0 and env.queue_depth("sntrack.comparison.dlq") == 0


def report_json(env, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "sntrack", "report", "--format", "json", *args], env=cli_env(env),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def rounded(value):
    """A report with its floats to 9 significant digits (summaries from sn_comparison's sums and from the trials
    differ in the last bits), without when it was made and where its summaries came from."""
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items() if k not in ("generated_at", "source")}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return float(f"{value:.9g}") if isinstance(value, float) else value


async def test_report_schema_says_what_the_report_said_at_that_time_and_reads_no_live_table(env):
    study = synthetic_study(16, 4, producer=producer_info(), seed=6, paired=True)
    events = [e for trial in study for e in trial]
    cutoff = study[9][-1].occurred_at
    names = ("journal", "trials", "comparison")
    for name in names:
        await apply(env, name, [e for e in events if e.occurred_at <= cutoff])
    then = report_json(env)
    for name in names:
        await apply(env, name, [e for e in events if e.occurred_at > cutoff])
    now = report_json(env)
    assert rounded(then) != rounded(now)

    run = subprocess.run([sys.executable, "-m", "sntrack", "replay", "trials", "--until", cutoff.isoformat(),
                          "--into", "monday"], env=cli_env(env), capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    live = await env.snapshot(*TABLES, "sn_comparison", "applied_events")
    past = report_json(env, "--schema", "monday")
    assert past["source"] == "trials" and rounded(past) == rounded(then)
    for args, message in ((["--schema", "tuesday"], "holds no past state of trials"),
                          (["--schema", "monday", "--run", "nosuch"], "unknown search --run 'nosuch'")):
        run = subprocess.run([sys.executable, "-m", "sntrack", "report", *args], env=cli_env(env),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr and len(run.stderr.splitlines()) == 1, run.stderr
    assert rounded(report_json(env)) == rounded(now)
    assert await env.snapshot(*TABLES, "sn_comparison", "applied_events") == live


async def test_report_schema_names_replay_could_not_have_written_are_one_line(env):
    """`report --schema` reads what `replay --into` wrote: a name longer than PostgreSQL's 63 bytes was an asyncpg
    NameTooLongError traceback, and `public` (the live tables) was reported as if it were a past state."""
    for schema in ("a" * 100, "public", "pg_catalog", 'x"; DROP TABLE events; --'):
        run = subprocess.run([sys.executable, "-m", "sntrack", "report", "--schema", schema], env=cli_env(env),
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and len(run.stderr.splitlines()) == 1, (schema, run.stderr[-2000:])
        assert "--schema" in run.stderr
    assert await env.fetchval("SELECT count(*) FROM events") == 0  # still there


async def test_retired_tables_a_reader_holds_are_dropped_once_it_lets_go(env):
    """After a swap, a reader may still hold a retired table: the drop gives way (no deadlock, no error) and
    succeeds once the reader is done; the next rebuild would remove what is left."""
    conn, reader = await env.db(), await env.db()
    try:
        await conn.execute("CREATE SCHEMA sntrack_retired_trials; CREATE TABLE sntrack_retired_trials.trials (id text);"
                           "CREATE TABLE sntrack_retired_trials.trial_metrics (id text)")
        async with reader.transaction():
            await reader.fetch("SELECT * FROM sntrack_retired_trials.trials")  # holds ACCESS SHARE until it ends
            assert not await _drop_retired(conn, PROJECTIONS["trials"], "sntrack_retired_trials", attempts=3)
        assert await _drop_retired(conn, PROJECTIONS["trials"], "sntrack_retired_trials", attempts=3)
        assert not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'sntrack_retired_trials'")
    finally:
        await conn.close()
        await reader.close()
