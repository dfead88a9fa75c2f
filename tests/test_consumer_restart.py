"""A consumer of one projection that fails does not take its siblings down: it is restarted in-process."""

import asyncio

import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from consumers.service import RESTART_LIMIT, serve
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until

QUEUE = "sntrack.comparison"


def _break_comparison_queue(env) -> None:
    """An operator's slip: the comparison queue re-created as a classic queue, which the consumer cannot declare."""
    env.api.request("DELETE", f"queues/{env.vhost}/{QUEUE}")
    env.api.request("PUT", f"queues/{env.vhost}/{QUEUE}", {"durable": True, "arguments": {}})


async def test_failing_consumer_is_restarted_and_its_sibling_keeps_applying(env):
    _break_comparison_queue(env)
    stop = asyncio.Event()
    daemon = asyncio.create_task(serve(env.settings.consumer(), ["journal", "comparison"], stop))
    first = [e for trial in synthetic_study(20, 3, producer=producer_info(), seed=41) for e in trial]
    await env.publish_events(first)
    await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(first)), what="the journal")
    assert not daemon.done()

    env.api.request("DELETE", f"queues/{env.vhost}/{QUEUE}")  # the operator removes it; the next restart declares it
    await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/{QUEUE}") or {}).get("type") == "quorum",
                     what="the restarted consumer to declare its queue")
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
    _break_comparison_queue(env)
    events = [e for trial in synthetic_study(10, 3, producer=producer_info(), seed=43) for e in trial]
    await env.publish_events(events)
    with pytest.raises(ChannelPreconditionFailed):
        await asyncio.wait_for(serve(env.settings.consumer(), ["journal", "comparison"], asyncio.Event()), 120)
    # Meanwhile its sibling applied everything.
    assert await env.fetchval("SELECT count(*) FROM events") == len(events)
    assert RESTART_LIMIT > 1
