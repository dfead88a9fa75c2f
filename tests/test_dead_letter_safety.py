"""Dead-lettering never loses a message: a missing, unbound or full dead-letter queue keeps the original."""

import asyncio
from dataclasses import replace
from urllib.parse import urlsplit

import aio_pika
import pytest

from consumers.broker_admin import apply_topology
from consumers.runtime import DEAD_LETTER_MAX_BACKOFF_S
from consumers.service import running_consumers
from consumers.topology import QueueSpec
from schemas.topology import DEAD_LETTER_EXCHANGE, REASON_HEADER
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.test_dlq import _empty

QUEUE = "sntrack.journal"
DLQ = f"{QUEUE}.dlq"


async def test_missing_then_full_dead_letter_queue_keeps_the_original(env):
    async with running_consumers(env.settings.consumer(), ["journal"]) as (runtime,):
        env.api.request("DELETE", f"queues/{env.vhost}/{DLQ}")
        await env.publish_raw([b"poison while the DLQ is missing"])
        await wait_until(lambda: runtime.stats.dead_letter_failures >= 2, what="the returned dead letter")
        # Still in its queue (unacked, in the consumer's hands), neither acked nor dropped.
        await wait_until(lambda: env.queue_depth(QUEUE) == 1, what="the original to be counted in its queue")
        assert runtime.stats.dead_lettered == 0

        # An operator recreates the DLQ (with the sandbox's own users).
        await asyncio.to_thread(apply_topology, env.api, env.vhost, user_prefix=env.vhost)
        await wait_until(lambda: runtime.stats.dead_lettered == 1, timeout=60, what="the retried dead letter")
        failures_while_missing = runtime.stats.dead_letter_failures

        # A full DLQ (reject-publish) nacks: same outcome. Replace the DLQ by one that holds a single message.
        env.api.request("DELETE", f"queues/{env.vhost}/{DLQ}")
        env.api.request("PUT", f"queues/{env.vhost}/{DLQ}", {"durable": True, "arguments": {
            "x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"}})
        env.api.request("POST", f"bindings/{env.vhost}/e/ml.events.dlx/q/{DLQ}", {"routing_key": QUEUE})
        await _fill(env)
        await env.publish_raw([b"poison while the DLQ is full"])
        await wait_until(lambda: runtime.stats.dead_letter_failures >= failures_while_missing + 2,
                         what=f"the nacked dead letter ({runtime.stats}, DLQ depth {env.queue_depth(DLQ)})")
        await wait_until(lambda: env.queue_depth(QUEUE) == 1, what="the original to stay in its queue")
        assert runtime.stats.dead_lettered == 1
        filler = await env.dead_letters(QUEUE)  # the operator makes room
        await wait_until(lambda: runtime.stats.dead_lettered == 2, timeout=60, what="the dead letter after room")
        # Backed off, not a hot loop: a handful of tries over several seconds.
        assert runtime.stats.dead_letter_failures < 30
    await wait_until(lambda: env.queue_depth(QUEUE) == 0, what="the originals to be acked")
    letters = await env.dead_letters(QUEUE)
    assert {m.body for m in filler} == {b"filler"}
    assert [m.body for m in letters] == [b"poison while the DLQ is full"]
    assert letters[0].headers[REASON_HEADER] == "invalid_json"


async def test_a_dead_letter_waiting_through_a_lost_connection_is_sent_once(env):
    """A dead letter retried while its DLQ is missing must not be sent for a delivery whose channel died: the broker
    redelivers that message, and the redelivery is dead-lettered (before: both were, two copies in the DLQ)."""
    amqp = urlsplit(env.settings.amqp_url)
    with TcpProxy(amqp.hostname, amqp.port) as broker:
        config = replace(env.settings.consumer(), amqp_url=broker.url_for(env.settings.amqp_url))
        async with running_consumers(config, ["journal"]) as (runtime,):
            env.api.request("DELETE", f"queues/{env.vhost}/{DLQ}")
            await env.publish_raw([b"poison while the DLQ is missing"])
            await wait_until(lambda: runtime.stats.dead_letter_failures >= 1, what="the returned dead letter")
            broker.cut()  # the channel holding the poison dies; the broker puts it back in its queue
            await asyncio.sleep(1)
            broker.restore()
            await asyncio.to_thread(apply_topology, env.api, env.vhost, user_prefix=env.vhost)
            await wait_until(lambda: runtime.stats.dead_lettered >= 1, timeout=90, what="the dead letter")
            await wait_until(lambda: _empty(env, QUEUE), what="the original to be acked")
            await asyncio.sleep(DEAD_LETTER_MAX_BACKOFF_S + 1)  # a stale retry would have fired by now
    letters = await env.dead_letters(QUEUE)
    assert [m.body for m in letters] == [b"poison while the DLQ is missing"], [m.body for m in letters]


async def _fill(env) -> None:
    """Publish to the DLQ until it refuses (a quorum queue may take one beyond its limit before it does)."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        for _ in range(5):
            try:
                await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=DLQ)
            except aio_pika.exceptions.DeliveryError:
                return
            await asyncio.sleep(0.2)
        raise AssertionError("the DLQ never refused a message")
    finally:
        await connection.close()


@pytest.mark.slow  # about 3 minutes: the broker's retry timer
async def test_the_brokers_own_dead_letters_wait_for_a_missing_dlq_and_carry_delivery_limit(env):
    # The same arguments as every consumer queue, with a delivery limit of 1 to trip it at once.
    spec = QueueSpec("sntrack.backstop", delivery_limit=1)
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        await channel.default_exchange.publish(aio_pika.Message(b"crashes everything"), routing_key=spec.name)
        for _ in range(2):  # two deliveries returned unacked: beyond the limit of 1
            message = await queue.get(timeout=5)
            await message.nack(requeue=True)
        # No DLQ yet: at-least-once dead-lettering keeps the message instead of dropping it.
        await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/{spec.name}") or {})
                         .get("messages_dlx") == 1, what="the broker to hold the undeliverable dead letter")
        dlq = await channel.declare_queue(spec.dead_letter_queue, durable=True, arguments=spec.dead_letter_arguments)
        await dlq.bind(DEAD_LETTER_EXCHANGE, routing_key=spec.name)
        # The broker retries undelivered dead letters on a timer (dead_letter_worker_publisher_confirm_timeout_ms,
        # 2 minutes by default).
        letter = await wait_until(lambda: dlq.get(fail=False, timeout=5), timeout=240, interval=2,
                                  what="the dead letter")
        assert letter.body == b"crashes everything"
        assert letter.headers["x-first-death-reason"] == "delivery_limit"
    finally:
        await connection.close()
