"""infra/rabbitmq/definitions.json, the code's topology and the live broker agree; permissions are least."""

import asyncio
import json
import secrets

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from consumers.registry import QUEUES
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE
from sntrack.broker import CONSUMER_USER, DEFINITIONS_FILE, WORKER_USER, apply_topology, build_definitions


def test_definitions_file_matches_code():
    assert json.loads(DEFINITIONS_FILE.read_text()) == build_definitions(), "run `make topology`"


def test_every_queue_is_quorum_with_delivery_limit_and_dead_letters():
    for queue in build_definitions()["queues"]:
        assert queue["durable"] and queue["arguments"]["x-queue-type"] == "quorum"
        if not queue["name"].endswith(".dlq"):
            assert queue["arguments"]["x-delivery-limit"] >= 1
            assert queue["arguments"]["x-dead-letter-exchange"] == DEAD_LETTER_EXCHANGE


def test_definitions_import_into_a_vhost(env):
    # The file is importable: load it into a fresh vhost through the management API's definitions import.
    vhost = env.vhost + "-import"
    env.api.request("PUT", f"vhosts/{vhost}", {})
    try:
        text = DEFINITIONS_FILE.read_text().replace('"vhost": "sntrack"', f'"vhost": "{vhost}"')
        env.api.request("POST", f"definitions/{vhost}", json.loads(text))
        for spec in QUEUES:
            info = env.api.request("GET", f"queues/{vhost}/{spec.name}")
            assert info["arguments"] == spec.arguments
    finally:
        env.api.request("DELETE", f"vhosts/{vhost}")


def test_apply_is_idempotent_and_live_queues_match(env):
    apply_topology(env.api, env.vhost)
    apply_topology(env.api, env.vhost)
    for spec in QUEUES:
        live = env.api.request("GET", f"queues/{env.vhost}/{spec.name}")
        assert live["arguments"] == spec.arguments
        assert live["type"] == "quorum"
        bindings = env.api.request("GET", f"bindings/{env.vhost}/e/{EXCHANGE}/q/{spec.name}")
        assert sorted(b["routing_key"] for b in bindings) == sorted(spec.bindings)


async def _connect(env, user, password):
    url = env.settings.amqp_url.replace("guest:guest", f"{user}:{password}")
    return await aio_pika.connect(url)


@pytest.fixture
def passwords(env):
    secrets_by_user = {WORKER_USER: secrets.token_urlsafe(12), CONSUMER_USER: secrets.token_urlsafe(12)}
    apply_topology(env.api, env.vhost, secrets_by_user)
    yield secrets_by_user


async def test_worker_may_only_publish_to_ml_events(env, passwords):
    connection = await _connect(env, WORKER_USER, passwords[WORKER_USER])
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        await exchange.publish(aio_pika.Message(b"{}"), routing_key="ml.run.start")
        with pytest.raises(ChannelAccessRefused):
            queue = await channel.get_queue(QUEUES[0].name, ensure=False)
            await queue.get(fail=False)
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
            await dlx.publish(aio_pika.Message(b"{}"), routing_key=QUEUES[0].name)
        channel = await connection.channel()
        with pytest.raises(ChannelAccessRefused):
            await channel.declare_queue("sntrack.rogue", durable=True)
    finally:
        await connection.close()


async def test_consumer_may_read_its_queues_but_not_publish_events(env, passwords):
    connection = await _connect(env, CONSUMER_USER, passwords[CONSUMER_USER])
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUES[0].name, ensure=False)
        assert await queue.get(fail=False) is None
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            await exchange.publish(aio_pika.Message(b"{}"), routing_key="ml.run.start")
    finally:
        await connection.close()


async def test_users_without_password_cannot_log_in(env):
    with pytest.raises((aio_pika.exceptions.ProbableAuthenticationError, ConnectionError)):
        connection = await _connect(env, WORKER_USER, "")
        await connection.close()
    await asyncio.sleep(0)
