"""The EventPublisher and its spool against the real broker: confirms, outages, orphans, corrupt lines, CLI."""

from __future__ import annotations

import asyncio
import os
import re
import sys
import textwrap
import time
from urllib.parse import urlsplit

import pytest
import structlog

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.sample import synthetic_study
from producer.spool import Record, Spool, inspect
from sntrack.cli import build_parser
from tests.conftest import wait_until
from tests.faults import TcpProxy


def _events(trials: int, epochs: int, seed: int = 0) -> list:
    return [e for trial in synthetic_study(trials, epochs, seed=seed, producer=producer_info()) for e in trial]


def _proxied(env):
    parts = urlsplit(env.settings.amqp_url)
    proxy = TcpProxy(parts.hostname, parts.port or 5672)
    return proxy, env.settings.replace(amqp_url=proxy.url_for(env.settings.amqp_url))


def _spooled_events(spool_dir) -> int:
    return sum(segment.events for segment in inspect(spool_dir))


async def _journal_holds_exactly(env, events: list) -> None:
    expected = len(events)
    await wait_until(lambda: env.fetchval("SELECT count(*) >= $1 FROM events", expected), what=f"{expected} events")
    ids = {str(e.event_id) for e in events}
    rows = await env.fetch("SELECT event_id::text AS id FROM events")
    assert sorted(r["id"] for r in rows) == sorted(ids)


async def _out_of_order(env) -> int:
    """Journal rows that arrived after a later event of their trial (seq order vs. arrival order)."""
    return await env.fetchval("""
        SELECT count(*) FROM (
            SELECT seq, lag(seq) OVER (PARTITION BY trial_id ORDER BY position) AS previous FROM events) AS ordered
        WHERE seq < previous""")


async def test_published_study_reaches_journal_and_trials(env):
    events = _events(20, 8, seed=1)
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        with EventPublisher(env.settings.publisher()) as publisher:
            for event in events:
                publisher.publish(event)
            assert await asyncio.to_thread(publisher.flush, 30)
        await _journal_holds_exactly(env, events)
        await wait_until(lambda: env.fetchval("SELECT count(*) = 20 FROM trials WHERE status <> 'running'"))
    stats = publisher.stats
    assert (stats.published, stats.confirmed, stats.spooled, stats.pending) == (len(events), len(events), 0, 0)
    metrics = sum(1 for e in events if e.event_type == "ml.run.metric")
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == metrics
    assert _spooled_events(env.settings.spool_dir) == 0


async def test_events_go_out_in_batches_without_a_flush(env):
    """publish() does not wake the thread per event; the thread still sends what waits, unasked, and says what its
    work cost (PublisherStats.thread_cpu_s)."""
    events = _events(2, 5)
    with EventPublisher(env.settings.publisher()) as publisher:
        await wait_until(lambda: publisher.stats.connected, timeout=10, what="publisher connected")
        for event in events:
            publisher.publish(event)
        await wait_until(lambda: publisher.stats.confirmed == len(events), timeout=10, what="confirmed unflushed")
        await wait_until(lambda: publisher.stats.thread_cpu_s > 0, timeout=10, what="the thread's CPU time")


async def test_broker_unreachable_from_start_spools_without_blocking_then_delivers(env):
    events = _events(40, 23, seed=2)[:1000]
    proxy, settings = _proxied(env)
    with proxy:
        proxy.cut()
        publisher = EventPublisher(settings.publisher()).start()
        started = time.perf_counter()
        for event in events:
            publisher.publish(event)
        assert time.perf_counter() - started < 2.0, "publish() must not wait for the broker"
        assert await asyncio.to_thread(publisher.flush, 10)
        assert publisher.stats.spooled == len(events) and publisher.stats.confirmed == 0
        assert not publisher.stats.connected
        assert list(settings.spool_dir.glob("*.jsonl"))
        assert _spooled_events(settings.spool_dir) == len(events)

        async with running_consumers(env.settings.consumer(), ["journal"]):
            proxy.restore()
            assert await asyncio.to_thread(publisher.drain, 30)
            await _journal_holds_exactly(env, events)
            await asyncio.sleep(0.5)  # a duplicate would arrive now; the journal must still hold one row each
            assert await env.fetchval("SELECT count(*) FROM events") == len(events)
        assert await asyncio.to_thread(publisher.close, 10)
    assert publisher.stats.flushed_from_spool == len(events)
    assert _spooled_events(settings.spool_dir) == 0


async def test_broker_cut_mid_stream_loses_nothing(env):
    events = _events(100, 18, seed=3)[:2000]
    proxy, settings = _proxied(env)
    with proxy:
        async with running_consumers(env.settings.consumer(), ["journal"]):
            publisher = EventPublisher(settings.publisher()).start()
            await wait_until(lambda: publisher.stats.connected, timeout=10, what="publisher connected")
            for n, event in enumerate(events):
                publisher.publish(event)
                if n % 100 == 99:
                    await asyncio.sleep(0.03)
                if n == 700:
                    proxy.cut()
                if n == 1400:
                    proxy.restore()
            assert await asyncio.to_thread(publisher.drain, 30)  # close() alone would not wait for a reconnect
            assert await asyncio.to_thread(publisher.close, 10)
            await _journal_holds_exactly(env, events)
        assert await _out_of_order(env) == 0
    stats = publisher.stats
    assert stats.confirmed > 0 and stats.spooled > 0, stats
    assert stats.confirmed + stats.spooled == len(events)


async def test_full_buffer_spools_synchronously_in_order(env):
    events = _events(60, 20, seed=8)[:1200]
    settings = env.settings.replace(publish_buffer=20)
    async with running_consumers(env.settings.consumer(), ["journal"]):
        publisher = EventPublisher(settings.publisher()).start()
        await wait_until(lambda: publisher.stats.connected, timeout=10, what="publisher connected")
        for event in events:
            publisher.publish(event)
        assert publisher.stats.spooled > 0, "a 20-event buffer must overflow into the spool"
        assert await asyncio.to_thread(publisher.close, 30)
        await _journal_holds_exactly(env, events)
        assert await _out_of_order(env) == 0
    assert _spooled_events(settings.spool_dir) == 0


_DEAD_WORKER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from producer.emitter import producer_info
    from producer.sample import synthetic_study
    from producer.spool import Record, Spool
    events = [e for t in synthetic_study(6, 5, seed=4, producer=producer_info()) for e in t]
    Spool(Path(sys.argv[1])).append([Record.from_event(e) for e in events])
    print(" ".join(str(e.event_id) for e in events), flush=True)
    os._exit(0)  # dies holding its segment: no close(), the kernel drops the lock
""")


async def test_orphaned_segment_of_a_dead_process_is_drained_by_the_next_publisher(env):
    spool_dir = env.settings.spool_dir
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", _DEAD_WORKER, str(spool_dir),
                                                stdout=asyncio.subprocess.PIPE)
    stdout, _ = await dead.communicate()
    assert dead.returncode == 0
    orphan_ids = stdout.decode().split()
    assert [s.live for s in inspect(spool_dir)] == [False]

    live = Spool(spool_dir)  # a running process's segment must be left alone
    live_events = _events(2, 3, seed=5)
    live.append([Record.from_event(e) for e in live_events])
    try:
        async with running_consumers(env.settings.consumer(), ["journal"]):
            with EventPublisher(env.settings.publisher()) as publisher:
                assert await asyncio.to_thread(publisher.drain, 30)
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(orphan_ids)))
        rows = await env.fetch("SELECT event_id::text AS id FROM events")
        assert sorted(r["id"] for r in rows) == sorted(orphan_ids)
        assert publisher.stats.flushed_from_spool == len(orphan_ids)
        assert [(s.events, s.live) for s in inspect(spool_dir)] == [(len(live_events), True)]
    finally:
        live.close()


def test_truncated_last_line_is_skipped_with_a_warning(tmp_path):
    events = _events(2, 4, seed=6)
    writer = Spool(tmp_path)
    writer.append([Record.from_event(e) for e in events])
    writer.close()
    (segment,) = tmp_path.glob("*.jsonl")
    with segment.open("ab") as f:
        f.write(events[0].to_json()[:57])  # a crash in the middle of a write

    reader = Spool(tmp_path)
    assert reader.adopt_orphans() == len(events)
    with structlog.testing.capture_logs() as logs:
        chunk = reader.next_chunk(1000)
    assert [r.event_id for r in chunk.records] == [str(e.event_id) for e in events]
    assert chunk.skipped == 1
    assert any(entry["event"] == "skipping truncated spool line" for entry in logs)
    reader.commit(chunk)
    assert reader.next_chunk(1000) is None
    assert reader.release_if_drained()
    assert not list(tmp_path.glob("*.jsonl"))


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


async def test_cli_publish_sample_and_spool(env, capsys):
    assert "--trials" in _help(capsys, "publish-sample") and "--rate" in _help(capsys, "publish-sample")
    assert "orphaned" in _help(capsys, "spool", "status") and "--timeout" in _help(capsys, "spool", "flush")

    environ = {**os.environ, **env.settings.to_env()}
    async with running_consumers(env.settings.consumer(), ["journal"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "publish-sample", "--trials", "4", "--epochs", "5", "--rate", "200",
            "--seed", "7", "--run-id", "cli-run", env=environ, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        stdout, stderr = (stream.decode() for stream in await process.communicate())
        assert process.returncode == 0, stderr
        summary = re.search(r"published (\d+) events of 4 trials .*: (\d+) confirmed, (\d+) spooled", stdout)
        assert summary, stdout
        total, confirmed, spooled = map(int, summary.groups())
        assert (confirmed, spooled) == (total, 0)
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM events WHERE model_run_id = 'cli-run'", total), what="CLI events in journal")

    args = build_parser().parse_args(["spool", "status"])
    assert args.run(args, env.settings) == 0
    assert "empty" in capsys.readouterr().out
