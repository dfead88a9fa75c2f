"""Catch-up subscribers (`sntrack subscribe`, consumers/catchup.py): the journal's history, then the live queue,
with no gap and no duplicate at the switch; a subscriber killed with kill -9 resumes with no gap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import aio_pika
import pytest

from common.urls import with_login
from consumers.catchup import CatchUpSubscriber, Start, SubscriberRuntime, run_subscriber
from consumers.persistence import create_pool
from consumers.runtime import connect
from consumers.service import running_consumers
from consumers.subscriber import matching_types, topic_matches
from consumers.topology import subscriber_queue
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import EXCHANGE
from tests.conftest import wait_until
from tests.test_dlq import _depth
from tests.test_end_to_end import cli_env

REPO = Path(__file__).resolve().parent.parent


def study_events(trials: int, epochs: int, seed: int) -> list:
    return [e for trial in synthetic_study(trials, epochs, producer=producer_info(), seed=seed) for e in trial]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def start_subscriber(env, name: str, out: Path, *extra: str, delay_s: float = 0.0,
                           start: tuple[str, ...] = ("--from-start",)):
    """The subscriber as a process; its log goes to `out` with .log added."""
    log = open(f"{out}.log", "ab")  # noqa: SIM115, ASYNC230 - the child holds it
    try:
            return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", name, "--bind", "ml.run.#", *start,
            "--handler", "tests.subscriber_handlers:record", *extra, cwd=REPO,
            env={**cli_env(env), "SNTRACK_TEST_OUT": str(out), "SNTRACK_TEST_DELAY_S": str(delay_s),
                 "PYTHONPATH": str(REPO), "SNTRACK_LOG_JSON": "true"},
            stdout=asyncio.subprocess.DEVNULL, stderr=log)
    finally:
        log.close()


async def bound(out: Path) -> None:
    """Wait until the subscriber's queue is bound and consumed (the runtime logs it; the broker's statistics lag)."""
    log = Path(f"{out}.log")
    await wait_until(lambda: log.exists() and "consumer started" in log.read_text(), what="the subscriber to bind")


async def stop(process, out: Path) -> None:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 0, Path(f"{out}.log").read_text()[-3000:]


async def test_catch_up_then_live_loses_and_doubles_nothing_even_what_the_journal_had_not_written(env, tmp_path):
    history = study_events(60, 40, seed=1)      # 2,520 events: more than a page, slow enough to publish during it
    before_bind = study_events(10, 5, seed=2)   # published before the bind, journaled only after the catch-up read
    during = study_events(20, 5, seed=3)        # published while the subscriber catches up
    after = study_events(20, 5, seed=4)         # published once it is live
    out = tmp_path / "out.txt"
    config = env.settings.consumer()
    async with running_consumers(config, ["journal"]):
        await env.publish_events(history)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(history)), what="journal")
    await env.publish_events(before_bind)  # the journal consumer is stopped: they wait in sntrack.journal
    process = await start_subscriber(env, "all", out, delay_s=0.001)
    try:
        await bound(out)
        await env.publish_events(during)
        assert len(lines(out)) < len(history), "the catch-up ended before the events meant for it were published"
        # The catch-up read the journal without before_bind, and the first live event is not in the journal: the
        # subscriber waits for it, then finds before_bind below it.
        log = Path(f"{out}.log")
        await wait_until(lambda: "caught up from the journal" in log.read_text(), what="the catch-up to end")
        assert len(lines(out)) == len(history)
        async with running_consumers(config, ["journal"]):
            await wait_until(lambda: len(lines(out)) >= len(history) + len(before_bind) + len(during), timeout=60,
                             what="history, the events published before the bind and during the catch-up")
            await env.publish_events(after)
            expected = history + before_bind + during + after
            await wait_until(lambda: len(lines(out)) >= len(expected), timeout=60, what="the live events")
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(expected)), what="journal")
            await asyncio.sleep(1)  # a duplicate would come within the next live batch: give it time to show
    finally:
        await stop(process, out)
    got = lines(out)
    assert [e for e, n in Counter(got).items() if n > 1] == []
    assert sorted(got) == sorted(str(e.event_id) for e in expected)
    journal_order = [r["event_id"] for r in await env.fetch(
        "SELECT event_id::text FROM events ORDER BY position LIMIT $1", len(history))]
    assert got[:len(history)] == journal_order  # the history in journal order, first
    # What was published before the bind comes before anything published after it.
    assert set(got[len(history):len(history) + len(before_bind)]) == {str(e.event_id) for e in before_bind}
    row = await env.fetch("SELECT position, bindings FROM subscriber_positions WHERE name = 'all'")
    assert row[0]["bindings"] == ["ml.run.#"] and row[0]["position"] >= len(history)


async def test_a_subscriber_killed_with_kill_9_resumes_with_no_gap(env, tmp_path):
    history = study_events(40, 30, seed=5)  # 1,280 events
    live = study_events(40, 10, seed=6)
    out = tmp_path / "out.txt"
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(history)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(history)), what="journal")
        process = await start_subscriber(env, "crashy", out, delay_s=0.002)
        await wait_until(lambda: len(lines(out)) > 800, what="the catch-up to be under way")
        process.kill()  # kill -9 in the middle of the catch-up
        await process.wait()
        killed_at = len(lines(out))
        assert killed_at < len(history)
        process = await start_subscriber(env, "crashy", out, delay_s=0.002)
        publishing = asyncio.create_task(env.publish_events(live))
        await wait_until(lambda: len(set(lines(out))) > len(history) + 100, timeout=60, what="live events")
        process.kill()  # kill -9 while live, with the queue filling
        await process.wait()
        await publishing
        process = await start_subscriber(env, "crashy", out)
        try:
            expected = {str(e.event_id) for e in history + live}
            await wait_until(lambda: set(lines(out)) >= expected, timeout=90, what="every event after two kills")
        finally:
            await stop(process, out)
    got = lines(out)
    assert set(got) == expected
    # At least once: what was in hand at each kill may come again, and nothing else does.
    doubled = sum(n - 1 for n in Counter(got).values())
    assert doubled <= 2 * 2000, doubled
    # The second run resumed where the first stopped (its position is saved every 0.5 s), not from the start.
    again = set(got[:killed_at]) & set(got[killed_at:])
    assert len(again) < killed_at / 2, (len(again), killed_at)


@contextlib.asynccontextmanager
async def subscribed(env, pool, sink, name: str, max_length: int):
    """An in-process subscriber whose queue is bounded to `max_length`, taking one message at a time; live when
    this yields."""
    config = replace(env.settings.consumer(), prefetch=1)
    subscriber = CatchUpSubscriber(name, ["ml.run.#"], sink, pool)
    subscriber.queue = replace(subscriber.queue, max_length=max_length)
    await subscriber.load(Start())
    connection = await connect(config)
    running = asyncio.create_task(run_subscriber(subscriber, SubscriberRuntime(subscriber, config), connection))
    try:
        await wait_until(subscriber.caught_up.is_set, what="the subscriber to go live")
        yield subscriber
    finally:
        subscriber.stop()
        await running
        await connection.close()


async def test_an_overflowed_queue_is_filled_from_the_journal(env):
    live, stopped = study_events(3, 4, seed=7), study_events(4, 5, seed=8)
    received: list[str] = []
    flowing = asyncio.Event()

    async def sink(event) -> None:
        await flowing.wait()
        received.append(str(event.event_id))

    async def journaled(n: int) -> bool:
        return await env.fetchval("SELECT count(*) FROM events") == n

    async def maxlen_letters() -> int:
        letters = await wait_until(lambda: env.dead_letters("sntrack.sub.tiny"), what="maxlen dead letters")
        assert {m.headers["x-first-death-reason"] for m in letters} == {"maxlen"}
        return len(letters)

    pool = await create_pool(env.settings.database_url)
    try:
        async with running_consumers(env.settings.consumer(), ["journal"]):
            # Live, with its handler stuck on the first event: the queue keeps 3 and drops the others.
            async with subscribed(env, pool, sink, "tiny", max_length=3) as subscriber:
                await env.publish_events(live)
                await wait_until(lambda: journaled(len(live)), what="the journal")
                assert await maxlen_letters() >= len(live) - 5
                flowing.set()
                await wait_until(lambda: len(received) >= len(live), what="the live events and the gap")
                assert subscriber.delivered["journal"] >= len(live) - 5
            # Stopped: the queue keeps the last 3 of what is published meanwhile.
            await env.publish_events(stopped)
            await wait_until(lambda: journaled(len(live + stopped)), what="the journal")
            assert await maxlen_letters() == len(stopped) - 3
            async with subscribed(env, pool, sink, "tiny", max_length=3) as subscriber:
                await wait_until(lambda: len(received) >= len(live + stopped), what="the gap, from the journal")
                # The 3 still queued come live after the catch-up delivered them: skipped, not delivered again.
                await wait_until(lambda: subscriber.delivered["skipped"] == 3, what="the queued 3 to be skipped")
                assert subscriber.delivered["journal"] == len(stopped)
    finally:
        await pool.close()
    assert received == [str(e.event_id) for e in live + stopped]  # each once, in order


async def test_the_best_trial_per_arm_example_prints_each_new_best(env):
    events = study_events(12, 3, seed=9)
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "best", "--bind", "ml.run.stop", "--from-start",
            "--handler", "examples.best_trial_per_arm:handle", cwd=REPO, env={**cli_env(env), "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        printed = []
        try:
            stops = [e for e in events if e.event_type == "ml.run.stop" and e.payload.status == "completed"]
            bests, expected = {}, []
            for stop_event in stops:
                arm, accuracy = stop_event.payload.spectral_norm, stop_event.payload.measurements["final_val_accuracy"]
                if arm not in bests or accuracy > bests[arm]:
                    bests[arm] = accuracy
                    expected.append(stop_event.trial_id)
            for _ in expected:
                printed.append((await asyncio.wait_for(process.stdout.readline(), 30)).decode())
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert [line.split()[2] for line in printed] == expected
    assert all(line.startswith(("best SN: ", "best baseline: ")) for line in printed)


async def test_exec_failures_are_retried_then_dead_lettered_with_their_reason(env, tmp_path):
    history, live = study_events(3, 2, seed=12), study_events(3, 2, seed=13)
    bad = {history[1].trial_id, live[1].trial_id}  # every event of these two trials fails
    out = tmp_path / "out.txt"
    command = (f'read -r line; case "$line" in *\\"{sorted(bad)[0]}\\"*|*\\"{sorted(bad)[1]}\\"*) exit 1;; esac; '
               f"printf '%s\\n' \"$line\" >> {out}")
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(history)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(history)), what="journal")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "hook", "--bind", "ml.run.#", "--from-start", "--exec",
            command, env=cli_env(env), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            good = [e for e in history + live if e.trial_id not in bad]
            await env.publish_events(live)
            await wait_until(lambda: len(out.read_text().splitlines()) >= len(good) if out.exists() else False,
                             timeout=60, what="the good events")
            failing = [e for e in history + live if e.trial_id in bad]
            letters = []
            await wait_until(lambda: _gather_letters(env, letters, len(failing)), timeout=60, what="dead letters")
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 0
    assert sorted(json.loads(line)["event_id"] for line in out.read_text().splitlines()) == \
        sorted(str(e.event_id) for e in good)
    assert sorted(m.message_id for m in letters) == sorted(str(e.event_id) for e in failing)
    assert {m.headers["x-sntrack-reason"] for m in letters} == {"handler_error"}
    assert all("--exec exited with 1" in m.headers["x-sntrack-detail"] for m in letters)
    from_journal = {m.message_id for m in letters if m.headers.get("x-sntrack-source") == "journal"}
    assert from_journal >= {str(e.event_id) for e in history if e.trial_id in bad}  # the live ones may be too


async def test_a_requeued_dead_letter_is_delivered_once_its_cause_is_fixed(env, tmp_path):
    """Dead-lettered from the journal during the catch-up, so behind the subscriber's position: `sntrack dlq requeue`
    still gets it delivered."""
    events = study_events(3, 2, seed=20)
    bad = events[1].trial_id
    out, fixed = tmp_path / "out.txt", tmp_path / "fixed"
    command = (f'read -r line; case "$line" in *\\"{bad}\\"*) test -e {fixed} || exit 1;; esac; '
               f"printf '%s\\n' \"$line\" >> {out}")
    failing = [e for e in events if e.trial_id == bad]
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "fixme", "--from-start", "--exec", command,
            env=cli_env(env), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await wait_until(lambda: env.queue_depth("sntrack.sub.fixme.dlq") == len(failing), timeout=60,
                             what="the failing trial's events in the dead-letter queue")
            fixed.touch()
            requeue = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sntrack", "dlq", "requeue", "sntrack.sub.fixme.dlq", env=cli_env(env),
                stdout=asyncio.subprocess.DEVNULL)
            assert await requeue.wait() == 0
            await wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= len(events),
                             what="the requeued events")
            await asyncio.sleep(0.5)
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
    assert sorted(json.loads(line)["event_id"] for line in out.read_text().splitlines()) == \
        sorted(str(e.event_id) for e in events)


async def _gather_letters(env, letters: list, n: int) -> bool:
    letters.extend(await env.dead_letters("sntrack.sub.hook"))
    return len(letters) >= n


async def test_from_time_starts_at_the_first_event_that_occurred_then_and_jsonl_appends(env, tmp_path):
    earlier, later = study_events(3, 2, seed=14), study_events(3, 2, seed=15)  # `later` occurred after `earlier`
    out = tmp_path / "events.jsonl"
    out.write_text("")
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(earlier + later)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(earlier + later)), what="jnl")
        since = min(e.occurred_at for e in later).isoformat()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "recent", "--bind", "ml.run.start", "ml.run.stop",
            "--from", since, "--jsonl", str(out), env=cli_env(env), stderr=asyncio.subprocess.DEVNULL)
        wanted = [str(e.event_id) for e in later if e.event_type != "ml.run.metric"]
        try:
            await wait_until(lambda: len(out.read_text().splitlines()) >= len(wanted), what="the events since then")
            await asyncio.sleep(0.5)  # nothing more may come
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 0
    assert [json.loads(line)["event_id"] for line in out.read_text().splitlines()] == wanted


async def test_a_queue_older_than_its_position_keeps_its_backlog(env, tmp_path):
    """A subscriber of an earlier version had a queue and no position: what it holds is delivered, once."""
    backlog, live = study_events(2, 3, seed=18), study_events(2, 3, seed=19)
    spec = subscriber_queue("old", ("ml.run.#",))
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        await queue.bind(EXCHANGE, routing_key="ml.run.#")
    finally:
        await connection.close()
    out = tmp_path / "out.txt"
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(backlog)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(backlog)), what="journal")
        process = await start_subscriber(env, "old", out, start=())  # from now: the backlog is older
        try:
            await wait_until(lambda: len(lines(out)) >= len(backlog), what="the backlog, from the queue")
            await env.publish_events(live)
            await wait_until(lambda: len(lines(out)) >= len(backlog + live), what="the live events")
            await asyncio.sleep(0.5)
        finally:
            await stop(process, out)
    assert lines(out) == [str(e.event_id) for e in backlog + live]


async def test_a_catch_up_without_the_journal_consumer_stops_after_the_wait_and_acks_nothing(env, tmp_path):
    await env.publish_events(study_events(1, 1, seed=10))  # not journaled: no journal consumer runs
    out = tmp_path / "out.txt"
    process = await start_subscriber(env, "waiting", out, "--journal-wait", "1")
    await bound(out)
    await env.publish_events(study_events(1, 1, seed=11))
    await asyncio.wait_for(process.wait(), 60)
    assert process.returncode == 2
    last = Path(f"{out}.log").read_text().strip().splitlines()[-1]
    assert last.startswith("sntrack: the journal does not hold event") and "sntrack consume journal" in last
    assert env.queue_depth("sntrack.sub.waiting") or await wait_until(
        lambda: env.queue_depth("sntrack.sub.waiting") == 3, what="the live events, still queued")


# The least a subscriber needs in PostgreSQL (the writer role of consumers/roles.py has these and more).
SUBSCRIBER_GRANTS = ("GRANT SELECT ON events TO {role}",
                     "GRANT SELECT, INSERT, UPDATE ON subscriber_positions TO {role}",
                     "GRANT SELECT, INSERT, UPDATE, DELETE ON consumer_attempts TO {role}")


async def test_a_subscriber_needs_only_its_own_queues_the_journal_and_its_position(env, tmp_path):
    """On the broker, the subscriber role's user (consumers/broker_admin.py: sntrack.sub.* and binding to ml.events
    only); in PostgreSQL, a role with SUBSCRIBER_GRANTS and nothing else."""
    history, live = study_events(4, 3, seed=16), study_events(4, 3, seed=17)
    role = f"{env.database}_sub"  # named after the sandbox database: removed with it if this run is interrupted
    conn = await env.db()
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN")
        for grant in SUBSCRIBER_GRANTS:
            await conn.execute(grant.format(role=role))
        narrow = replace(env, settings=env.settings.replace(
            amqp_url=env.roles["subscriber"], database_url=with_login(env.settings.database_url, role, "-")))
        out = tmp_path / "out.txt"
        async with running_consumers(env.settings.consumer(), ["journal"]):
            await env.publish_events(history)
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(history)), what="journal")
            process = await start_subscriber(narrow, "narrow", out)
            try:
                await bound(out)
                await env.publish_events(live)
                await wait_until(lambda: set(lines(out)) >= {str(e.event_id) for e in history + live},
                                 what="history and live events, with the narrow rights")
            finally:
                await stop(process, out)
        assert sorted(lines(out)) == sorted(str(e.event_id) for e in history + live)
    finally:
        with contextlib.suppress(Exception):
            await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()


def test_cli_errors_are_one_line(env):
    import subprocess

    for argv, message in ((["subscribe", "x", "--bind", "foo.bar"], "matches no event type"),
                          (["subscribe", "x", "--handler", "nope"], "module:function"),
                          (["subscribe", "x", "--handler", "no_such_module_xyz:f"], "No module named")):
        run = subprocess.run([sys.executable, "-m", "sntrack", *argv], env=cli_env(env), capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


@pytest.mark.parametrize(("pattern", "key", "matches"), [
    ("ml.run.#", "ml.run.stop", True), ("#", "ml.run.stop", True), ("ml.*.stop", "ml.run.stop", True),
    ("ml.run.stop", "ml.run.stop", True), ("ml.run.*", "ml.run", False), ("ml.run.#", "ml.run", True),
    ("*.stop", "ml.run.stop", False), ("#.stop", "ml.run.stop", True), ("ml.#.stop", "ml.stop", True),
    ("ml.run.start", "ml.run.stop", False),
])
def test_topic_patterns_match_as_the_broker_routes(pattern, key, matches):
    assert topic_matches(pattern, key) is matches


def test_patterns_become_event_types():
    assert matching_types(["ml.run.stop", "ml.*.start"]) == ["ml.run.start", "ml.run.stop"]


async def test_a_second_copy_of_a_running_subscriber_is_refused_in_one_line(env, tmp_path):
    """Two copies of `sntrack subscribe NAME` would share its queue (each getting part of the live events) and its
    position row (last writer wins, so it could move backwards): the second one is refused while the first runs."""
    out = tmp_path / "out.txt"
    first = await start_subscriber(env, "twice", out)
    try:
        await bound(out)
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "twice", "--bind", "ml.run.#", "--from-start",
            cwd=REPO, env={**cli_env(env), "PYTHONPATH": str(REPO)},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(second.communicate(), 60)
        finally:
            if second.returncode is None:
                second.kill()
                await second.wait()
        assert second.returncode == 2 and err.decode().count("\n") == 1, err.decode()[-2000:]
        assert "already running" in err.decode()
        assert first.returncode is None  # the first one is left alone
    finally:
        await stop(first, out)
    again = await start_subscriber(env, "twice", tmp_path / "again.txt")  # the name is free once the first stopped
    try:
        await bound(tmp_path / "again.txt")
    finally:
        await stop(again, tmp_path / "again.txt")


async def test_a_reader_that_goes_away_stops_the_subscriber_and_the_rest_waits_for_the_next_run(env, tmp_path):
    """`sntrack subscribe … | head -n 1`: the subscriber used to retry the closed pipe for ever. It notices at its
    next write, as any program writing to a pipe does."""
    events = [e for e in study_events(10, 4, seed=16) if e.event_type == "ml.run.metric"]
    history, live = events[:10], events[10:]
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(history)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(history)), what="the journal")
        reader, writer = os.pipe()
        piped = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "piped", "--bind", "ml.run.metric", "--from-start",
            env=cli_env(env), stdout=writer, stderr=asyncio.subprocess.PIPE)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            first = json.loads(await asyncio.to_thread(pipe.readline))["event_id"]
        await env.publish_events(live)  # the next write finds the reader gone
        _, err = await asyncio.wait_for(piped.communicate(), 60)
        text = err.decode()
        assert piped.returncode == 0 and "the output was closed" in text, text[-3000:]
        assert "Traceback" not in text and "Exception ignored" not in text, text[-3000:]
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="the journal")
        delivered, order = await read_to_the_tail(env, "piped", tmp_path / "rest.jsonl")
    # The next run starts with the event whose write failed, not after it: the journal's tail is all there.
    assert first == order[0] and delivered == order[order.index(delivered[0]):]


async def read_to_the_tail(env, name: str, out: Path, *args: str) -> tuple[list[str], list[str]]:
    """Run `sntrack subscribe NAME ARGS --jsonl OUT` until it has written the journal's last event, then stop it:
    (the event ids written to OUT, the journal's event ids in order)."""
    order = [r["event_id"] for r in await env.fetch("SELECT event_id::text FROM events ORDER BY position")]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sntrack", "subscribe", name, *args, "--jsonl", str(out), env=cli_env(env),
        stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_until(lambda: _written(out)[-1:] == order[-1:], what=f"{name} to write the journal's last event")
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 60)
    return _written(out), order


def _written(path: Path) -> list[str]:
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()] if path.exists() else []


async def test_a_full_disk_is_waited_out_not_dead_lettered(env, tmp_path):
    events = [e for e in study_events(3, 2, seed=17) if e.event_type == "ml.run.stop"]
    async with running_consumers(env.settings.consumer(), ["journal"]):
        await env.publish_events(events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="the journal")
        log = tmp_path / "full.log"
        with open(log, "wb") as stderr:  # noqa: ASYNC230 - the child holds it
            full = await asyncio.create_subprocess_exec(  # /dev/full: every write fails with ENOSPC
                sys.executable, "-m", "sntrack", "subscribe", "disk", "--bind", "ml.run.stop", "--from-start",
                "--jsonl", "/dev/full", env=cli_env(env), stderr=stderr)
            try:
                await wait_until(lambda: log.read_text().count("No space left on device") >= 5, what="retries")
            finally:
                full.send_signal(signal.SIGTERM)
                await asyncio.wait_for(full.wait(), 60)
        # Stopped while still failing it may exit 2 saying why; either way nothing was dead-lettered.
        text = log.read_text()
        assert full.returncode in (0, 2) and "Traceback" not in text and '"dead_lettered": 0' in text, text[-3000:]
        assert await _depth(env, "sntrack.sub.disk.dlq") == 0
        delivered, _ = await read_to_the_tail(env, "disk", tmp_path / "disk.jsonl")  # once there is room
    assert sorted(delivered) == sorted(str(e.event_id) for e in events)
