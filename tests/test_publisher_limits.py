"""The publisher at its limits, against the real broker: a full disk during an outage, unroutable events."""

from __future__ import annotations

import asyncio
import errno
import json
import subprocess
from urllib.parse import quote

import aio_pika
import pytest

from consumers.broker_admin import UNROUTED_POLICY
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.publisher import EventPublisher, SpoolFull
from producer.sample import synthetic_study
from producer.spool import Record, Spool, inspect
from schemas import EXCHANGE
from sntrack.cli import build_parser
from tests.conftest import wait_until
from tests.test_publisher import _journal_holds_exactly, _proxied


def _events(trials: int, epochs: int, seed: int) -> list:
    return [e for trial in synthetic_study(trials, epochs, seed=seed, producer=producer_info()) for e in trial]


async def test_full_disk_and_no_broker_bound_the_buffer_then_the_broker_takes_it(env, monkeypatch):
    """Broker unreachable and the disk full: publish() takes `publish_buffer` events, then raises SpoolFull (the
    event is refused, not silently dropped). When the broker returns, the buffer goes out though the disk is still
    full."""
    def disk_full(self, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Spool, "append", disk_full)
    proxy, settings = _proxied(env)
    settings = settings.replace(publish_buffer=50)
    events = _events(20, 10, seed=11)
    with proxy:
        proxy.cut()
        publisher = EventPublisher(settings.publisher()).start()
        accepted = []
        with pytest.raises(SpoolFull, match="spool"):
            for event in events:
                publisher.publish(event)
                accepted.append(event)
        assert len(accepted) == 50
        assert publisher.stats.published == 50 and publisher.stats.pending == 50
        async with running_consumers(env.settings.consumer(), ["journal"]):
            proxy.restore()
            assert await asyncio.to_thread(publisher.drain, 60)
            await _journal_holds_exactly(env, accepted)
        assert await asyncio.to_thread(publisher.close, 10)
    assert publisher.stats.confirmed == 50 and publisher.stats.spooled == 0


async def _bind_only_start_and_stop(env) -> None:
    """ml.events redeclared bare (no alternate exchange, its policy removed) with one queue bound to starts and
    stops only."""
    await asyncio.to_thread(env.api.request, "DELETE", f"policies/{quote(env.vhost, safe='')}/{UNROUTED_POLICY}")
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(EXCHANGE)
        exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("probe", durable=True)
        for key in ("ml.run.start", "ml.run.stop"):
            await queue.bind(exchange, key)
    finally:
        await connection.close()


async def test_unroutable_events_are_quarantined_and_never_block_the_spool(env, capsys):
    await _bind_only_start_and_stop(env)
    spooled = _events(3, 4, seed=12)  # an orphaned segment, drained through the spool path
    orphan = Spool(env.settings.spool_dir)
    orphan.append([Record.from_event(e) for e in spooled])
    orphan.close()
    direct = _events(3, 4, seed=13)
    with EventPublisher(env.settings.publisher()) as publisher:
        assert await asyncio.to_thread(publisher.drain, 30), "an unroutable event must not hold the spool"
        for event in direct:
            publisher.publish(event)
        assert await asyncio.to_thread(publisher.drain, 30)
    everything = spooled + direct
    metrics = [e for e in everything if e.event_type == "ml.run.metric"]
    stats = publisher.stats
    assert stats.rejected == len(metrics) and stats.pending == 0
    assert stats.flushed_from_spool + stats.confirmed == len(everything) - len(metrics)
    assert not inspect(env.settings.spool_dir)
    await wait_until(lambda: env.queue_depth("probe") == len(everything) - len(metrics), what="starts and stops")

    quarantined = [json.loads(line) for path in sorted((env.settings.spool_dir / "rejected").glob("*.jsonl"))
                   for line in path.read_text().splitlines()]
    assert sorted(q["event"]["event_id"] for q in quarantined) == sorted(str(e.event_id) for e in metrics)
    assert {q["reason"] for q in quarantined} == {"312 NO_ROUTE"}
    args = build_parser().parse_args(["spool", "status"])
    assert args.run(args, env.settings) == 0
    assert f"quarantined: {len(metrics)} unroutable events" in capsys.readouterr().out


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a really full disk (root only)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


async def test_a_really_full_disk_loses_and_corrupts_nothing(env, tiny_disk):
    """On a 64 KiB tmpfs with the broker away: the spool fills (short writes, then ENOSPC, cut back), publish()
    refuses with SpoolFull, and every accepted event reaches the journal once the broker is back."""
    proxy, settings = _proxied(env)
    settings = settings.replace(publish_buffer=50, spool_dir=tiny_disk / "spool")
    events = _events(60, 20, seed=14)
    with proxy:
        proxy.cut()
        publisher = EventPublisher(settings.publisher()).start()
        accepted = []
        with pytest.raises(SpoolFull):
            for event in events:
                publisher.publish(event)
                accepted.append(event)
        assert 50 < len(accepted) < len(events)
        # The publishing thread retries the disk in the background: between its append and its count, the spool
        # holds events still counted as pending, so the two are compared once it is between writes.
        await wait_until(lambda: sum(s.events for s in inspect(settings.spool_dir)) + publisher.stats.pending
                         == len(accepted), timeout=5, interval=0.01, what="every accepted event spooled or pending")
        async with running_consumers(env.settings.consumer(), ["journal"]):
            proxy.restore()
            assert await asyncio.to_thread(publisher.drain, 60)
            await _journal_holds_exactly(env, accepted)
        assert await asyncio.to_thread(publisher.close, 10)
