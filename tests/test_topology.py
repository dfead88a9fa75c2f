"""infra/rabbitmq/definitions.json, the code's topology and the live broker agree; permissions are least."""

import asyncio
import json
import re
import secrets
import subprocess
import sys

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from common.errors import ConfigurationError
from consumers.broker_admin import (
    CONSUMER_USER,
    DEFINITIONS_FILE,
    UNROUTED,
    UNROUTED_POLICY,
    WORKER_USER,
    apply_topology,
    build_definitions,
)
from consumers.registry import QUEUES
from consumers.topology import subscriber_queue
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE
from tests.conftest import wait_until
from tests.test_end_to_end import cli_env


def test_definitions_file_matches_code():
    assert json.loads(DEFINITIONS_FILE.read_text()) == build_definitions(), "run `make topology`"


def test_every_queue_is_quorum_with_delivery_limit_and_dead_letters():
    consumer_queues = {spec.name for spec in QUEUES}
    for queue in build_definitions()["queues"]:
        assert queue["durable"] and queue["arguments"]["x-queue-type"] == "quorum"
        if queue["name"] in consumer_queues:
            # A backstop high above any number of restarts; the runtime dead-letters crash loops itself.
            assert queue["arguments"]["x-delivery-limit"] >= 100
            assert queue["arguments"]["x-dead-letter-exchange"] == DEAD_LETTER_EXCHANGE
            assert queue["arguments"]["x-dead-letter-strategy"] == "at-least-once"
        else:  # dead-letter queues and ml.events.unrouted: bounded, and full means refused, never dropped
            assert queue["name"].endswith(".dlq") or queue["name"] == UNROUTED
            assert queue["arguments"]["x-max-length"] > 0 and queue["arguments"]["x-max-length-bytes"] > 0
            assert queue["arguments"]["x-overflow"] == "reject-publish"


def test_subscriber_queues_are_bounded_and_drop_their_oldest():
    arguments = subscriber_queue("x", ("ml.run.#",)).arguments
    assert arguments["x-max-length"] > 0 and arguments["x-max-length-bytes"] > 0
    assert arguments["x-overflow"] == "drop-head"


async def test_unroutable_events_land_in_the_unrouted_queue(env, passwords):
    # As the worker, who may only publish to ml.events: a routing key no queue binds is neither returned nor lost.
    connection = await _connect(env, WORKER_USER, passwords[WORKER_USER])
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for key in ("ml.nobody.listens", "ml.trial.started"):
            await exchange.publish(aio_pika.Message(key.encode()), routing_key=key, mandatory=True)
    finally:
        await connection.close()
    policy = env.api.request("GET", f"policies/{env.vhost}/{UNROUTED_POLICY}")
    assert policy["definition"] == {"alternate-exchange": UNROUTED}
    await wait_until(lambda: env.queue_depth(UNROUTED) == 2, what="the management API to count them")
    status = subprocess.run([sys.executable, "-m", "sntrack", "status"], env=cli_env(env), capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert re.search(r"ml\.events\.unrouted\s+ready=2\b", status.stdout), status.stdout
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(UNROUTED, ensure=False)
        bodies = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            bodies.append(message.body)
            await message.ack()
    finally:
        await connection.close()
    assert sorted(bodies) == [b"ml.nobody.listens", b"ml.trial.started"]


def test_apply_refuses_to_silently_keep_a_queue_with_other_arguments(env):
    name = QUEUES[0].dead_letter_queue
    env.api.request("DELETE", f"queues/{env.vhost}/{name}")
    env.api.request("PUT", f"queues/{env.vhost}/{name}", {"durable": True, "arguments": {"x-queue-type": "quorum"}})
    with pytest.raises(ConfigurationError, match=f"queue {name} exists with other arguments"):
        apply_topology(env.api, env.vhost)


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
