"""A consumer of one projection that fails does not take its siblings down: it is restarted in-process."""

import asyncio
import contextlib

import aio_pika
import pytest
from aiormq.exceptions import ChannelLockedResource

from consumers.broker_admin import apply_topology
from consumers.service import RESTART_LIMIT, serve
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until

QUEUE = "sntrack.comparison"


@contextlib.asynccontextmanager
async def _comparison_queue_locked(env):
    """An operator's slip: the comparison queue replaced by an exclusive queue of another connection, which the
    consumer cannot even look at (RESOURCE_LOCKED) while that connection lives. Leaving, the queue is gone."""
    env.api.request("DELETE", f"queues/{env.vhost}/{QUEUE}")
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        await (await connection.channel()).declare_queue(QUEUE, exclusive=True)
        yield
    finally:
        await connection.close()


async def test_failing_consumer_is_restarted_and_its_sibling_keeps_applying(env):
    stop = asyncio.Event()
    async with _comparison_queue_locked(env):
        daemon = asyncio.create_task(serve(env.settings.consumer(), ["journal", "comparison"], stop))
        first = [e for trial in synthetic_study(20, 3, producer=producer_info(), seed=41) for e in trial]
        await env.publish_events(first)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(first)), what="the journal")
        assert not daemon.done()
    # The operator declares the queue again; the next restart finds it.
    await asyncio.to_thread(apply_topology, env.api, env.vhost, user_prefix=env.vhost)
    await wait_until(lambda: env.consumers(QUEUE) == 1, what="the restarted consumer on its queue")
    second = synthetic_study(10, 3, producer=producer_info(), seed=42)
    await env.publish_events([e for trial in second for e in trial])
    await wait_until(lambda: env.fetchval(
        "SELECT count(*) = $1 FROM applied_events WHERE projection = 'comparison'", len(second)),
        what="the restarted comparison consumer to apply the new stops")
    total = len(first) + sum(len(t) for t in second)
    await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", total), what="the journal sibling")
    stop.set()
    assert await asyncio.wait_for(daemon, 30) == 0
    assert await env.fetchval("SELECT count(*) FROM events") == total


async def test_a_consumer_that_keeps_failing_ends_the_daemon_after_its_restarts(env):
    events = [e for trial in synthetic_study(10, 3, producer=producer_info(), seed=43) for e in trial]
    async with _comparison_queue_locked(env):
        await env.publish_events(events)
        with pytest.raises(ChannelLockedResource):
            await asyncio.wait_for(serve(env.settings.consumer(), ["journal", "comparison"], asyncio.Event()), 120)
    # Meanwhile its sibling applied everything.
    assert await env.fetchval("SELECT count(*) FROM events") == len(events)
    assert RESTART_LIMIT > 1
