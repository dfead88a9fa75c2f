"""Dead-lettering never loses a message: a missing, unbound or full dead-letter queue keeps the original."""

import asyncio

import aio_pika

from consumers.service import running_consumers
from schemas.topology import REASON_HEADER
from sntrack.broker import apply_topology
from tests.conftest import wait_until

QUEUE = "sntrack.journal"
DLQ = f"{QUEUE}.dlq"


async def test_missing_then_full_dead_letter_queue_keeps_the_original(env):
    async with running_consumers(env.settings, ["journal"]) as (runtime,):
        env.api.request("DELETE", f"queues/{env.vhost}/{DLQ}")
        await env.publish_raw([b"poison while the DLQ is missing"])
        await wait_until(lambda: runtime.stats.dead_letter_failures >= 2, what="the returned dead letter")
        # Still in its queue (unacked, in the consumer's hands), neither acked nor dropped.
        await wait_until(lambda: env.queue_depth(QUEUE) == 1, what="the original to be counted in its queue")
        assert runtime.stats.dead_lettered == 0

        await asyncio.to_thread(apply_topology, env.api, env.vhost)  # an operator recreates the DLQ
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
