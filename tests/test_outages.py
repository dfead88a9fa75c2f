"""Consumers ride out a lost database and a lost broker: nothing lost, nothing applied twice."""

import asyncio
from urllib.parse import urlsplit

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.faults import TcpProxy


def _proxy_for(url: str) -> TcpProxy:
    parts = urlsplit(url)
    return TcpProxy(parts.hostname, parts.port)


async def test_database_and_broker_outages_mid_stream(env):
    study = synthetic_study(120, 10, producer=producer_info(), seed=21)
    events = [e for trial in study for e in trial]
    thirds = [events[: len(events) // 3], events[len(events) // 3: 2 * len(events) // 3],
              events[2 * len(events) // 3:]]
    with _proxy_for(env.settings.amqp_url) as broker, _proxy_for(env.settings.database_url) as database:
        settings = env.settings.replace(amqp_url=broker.url_for(env.settings.amqp_url),
                                        database_url=database.url_for(env.settings.database_url))
        async with running_consumers(settings.consumer(), ["journal", "trials"]) as runtimes:
            await env.publish_events(thirds[0])
            await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM events"), what="progress")

            database.cut()  # PostgreSQL "restarts" while batches are in flight
            await env.publish_events(thirds[1], duplicates=50)
            await asyncio.sleep(2)
            database.restore()

            broker.cut()  # and then RabbitMQ
            await env.publish_events(thirds[2], duplicates=50)
            await asyncio.sleep(2)
            broker.restore()

            await wait_until(lambda: env.all_applied(("journal", "trials"), len(events)), timeout=90,
                             what="both projections to catch up")
            assert sum(r.stats.retries for r in runtimes) > 0  # the database outage was felt and retried
            assert broker.connections > 1  # and the broker connection was re-established
    assert await env.fetchval("SELECT count(*) FROM events") == len(events)
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == sum(e.event_type == "ml.run.metric"
                                                                          for e in events)
    live = await env.snapshot("trials", "trial_metrics")
    await env.replay("trials")
    assert await env.snapshot("trials", "trial_metrics") == live
