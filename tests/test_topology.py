"""infra/rabbitmq/definitions.json, the code's topology and the live broker agree; each role may do only its job:
the broker refuses the rest (ACCESS_REFUSED), each refusal asserted against the real broker."""

import asyncio
import json
import re
import signal
import subprocess
import sys

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from common.errors import ConfigurationError
from common.urls import with_login
from consumers.broker_admin import (
    DEFINITIONS_FILE,
    ROLE_PERMISSIONS,
    UNROUTED,
    UNROUTED_POLICY,
    apply_topology,
    build_definitions,
    delete_users,
    user_name,
)
from consumers.registry import QUEUES
from consumers.topology import subscriber_queue
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE, ROUTING_PATTERN_ALL
from schemas.topology import REASON_HEADER
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


async def test_unroutable_events_land_in_the_unrouted_queue(env):
    # As the worker, who may only publish to ml.events: a routing key no queue binds is neither returned nor lost.
    connection = await aio_pika.connect(env.roles["worker"])
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
        apply_topology(env.api, env.vhost, user_prefix=env.vhost)


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
    apply_topology(env.api, env.vhost, user_prefix=env.vhost)
    apply_topology(env.api, env.vhost, user_prefix=env.vhost)
    for spec in QUEUES:
        live = env.api.request("GET", f"queues/{env.vhost}/{spec.name}")
        assert live["arguments"] == spec.arguments
        assert live["type"] == "quorum"
        bindings = env.api.request("GET", f"bindings/{env.vhost}/e/{EXCHANGE}/q/{spec.name}")
        assert sorted(b["routing_key"] for b in bindings) == sorted(spec.bindings)


async def _refused(connection: aio_pika.abc.AbstractConnection, action) -> str:
    """Run `action(channel)` on a fresh channel of `connection`; the broker must refuse it. Its reply."""
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(ChannelAccessRefused) as refusal:
        await action(channel)
    assert "ACCESS_REFUSED" in str(refusal.value)
    return str(refusal.value)


async def _publish(channel, exchange: str, routing_key: str) -> None:
    await (await channel.get_exchange(exchange, ensure=False)).publish(aio_pika.Message(b"{}"),
                                                                       routing_key=routing_key)


async def _get(channel, queue: str):
    return await (await channel.get_queue(queue, ensure=False)).get(fail=False)


async def _bind(channel, queue: str, exchange: str = EXCHANGE) -> None:
    await (await channel.get_queue(queue, ensure=False)).bind(exchange, routing_key=ROUTING_PATTERN_ALL)


async def _purge(channel, queue: str) -> None:
    await (await channel.get_queue(queue, ensure=False)).purge()


JOURNAL = next(spec for spec in QUEUES if spec.name == "sntrack.journal")  # the source of truth's queue


async def test_worker_may_only_publish_to_ml_events(env):
    connection = await aio_pika.connect(env.roles["worker"])
    try:
        await _publish(await connection.channel(publisher_confirms=True), EXCHANGE, "ml.run.start")
        for spec in QUEUES:
            await _refused(connection, lambda ch, q=spec.name: _get(ch, q))
        await _refused(connection, lambda ch: _publish(ch, DEAD_LETTER_EXCHANGE, JOURNAL.name))
        await _refused(connection, lambda ch: ch.declare_queue("sntrack.rogue", durable=True))
    finally:
        await connection.close()


async def test_consumer_reads_only_the_built_in_queues_and_publishes_only_dead_letters(env):
    connection = await aio_pika.connect(env.roles["consumer"])
    try:
        channel = await connection.channel(publisher_confirms=True)
        for spec in QUEUES:
            assert await _get(channel, spec.name) is None
        await _publish(channel, DEAD_LETTER_EXCHANGE, JOURNAL.name)  # confirmed: a dead letter
        await _refused(connection, lambda ch: _publish(ch, EXCHANGE, "ml.run.start"))
        await _refused(connection, lambda ch: _get(ch, JOURNAL.dead_letter_queue))
        await _refused(connection, lambda ch: _get(ch, UNROUTED))
        # No configure: it can neither (re-)declare nor delete a queue, not even its own, nor bind one.
        await _refused(connection, lambda ch: ch.declare_queue(JOURNAL.name, durable=True, arguments=JOURNAL.arguments))
        await _refused(connection, lambda ch: ch.declare_queue("sntrack.rogue", durable=True))
        await _refused(connection, lambda ch: ch.queue_delete(JOURNAL.name))
        await _refused(connection, lambda ch: _bind(ch, JOURNAL.name))
    finally:
        await connection.close()
    assert [m.body for m in await env.dead_letters(JOURNAL.name)] == [b"{}"]
    assert env.api.request("GET", f"queues/{env.vhost}/{JOURNAL.name}") is not None


async def test_subscriber_owns_only_sntrack_sub_queues(env):
    own = subscriber_queue("mine", (ROUTING_PATTERN_ALL,))
    connection = await aio_pika.connect(env.roles["subscriber"])
    try:
        # The journal's queue, the source of truth, is out of its reach: no read, delete, purge, bind or declare.
        await _refused(connection, lambda ch: _get(ch, JOURNAL.name))
        await _refused(connection, lambda ch: ch.queue_delete(JOURNAL.name))
        await _refused(connection, lambda ch: _purge(ch, JOURNAL.name))
        await _refused(connection, lambda ch: _bind(ch, JOURNAL.name))
        await _refused(connection, lambda ch: ch.declare_queue(JOURNAL.name, durable=True, arguments=JOURNAL.arguments))
        await _refused(connection, lambda ch: _get(ch, JOURNAL.dead_letter_queue))
        await _refused(connection, lambda ch: _publish(ch, EXCHANGE, "ml.run.start"))
        # Its own queue: declared, bound, read and deleted by itself.
        channel = await connection.channel()
        queue = await channel.declare_queue(own.name, durable=True, arguments=own.arguments)
        await queue.bind(EXCHANGE, routing_key=ROUTING_PATTERN_ALL)
        assert await queue.get(fail=False) is None
        await channel.queue_delete(own.name)
    finally:
        await connection.close()
    for spec in QUEUES:
        assert env.api.request("GET", f"queues/{env.vhost}/{spec.name}") is not None


CONSUME = [sys.executable, "-m", "sntrack", "consume"]


def _logging_in_with(env, url: str) -> dict[str, str]:
    return {**cli_env(env), "SNTRACK_AMQP_URL": url, "SNTRACK_LOG_JSON": "true"}


def _start_consume(env, url: str, *names: str) -> subprocess.Popen:
    return subprocess.Popen([*CONSUME, *names], env=_logging_in_with(env, url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


async def test_consume_as_the_consumer_role_applies_events_and_dead_letters_poison(env):
    # The real publisher as the worker role, the real daemon as the consumer role: their permissions suffice.
    daemon = _start_consume(env, env.roles["consumer"], "journal", "trials")
    try:
        published = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "sntrack", "publish-sample", "--trials", "3", "--epochs", "2"],
            env={**cli_env(env), "SNTRACK_AMQP_URL": env.roles["worker"]}, capture_output=True, text=True,
            timeout=120)
        assert published.returncode == 0, published.stderr
        events = int(re.search(r"published (\d+) events", published.stdout).group(1))
        assert f": {events} confirmed" in published.stdout
        await env.publish_raw([b"not json"])
        for name in ("journal", "trials"):
            await wait_until(lambda n=name: env.has_applied(n, events), timeout=60, what=f"{name} to apply every event")
        letters = {name: await wait_until(lambda n=name: env.dead_letters(f"sntrack.{n}"), timeout=60,
                                          what=f"the poison's dead letter from {name}")
                   for name in ("journal", "trials")}
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, stderr[-2000:]
    assert "ACCESS_REFUSED" not in stderr
    for messages in letters.values():
        assert [(m.body, m.headers[REASON_HEADER]) for m in messages] == [(b"not json", "invalid_json")]


def _consume(env, url: str, name: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CONSUME, name], env=_logging_in_with(env, url), capture_output=True, text=True,
                          timeout=60)


def test_consume_without_its_queue_or_its_permission_is_one_line(env):
    env.api.request("DELETE", f"queues/{env.vhost}/sntrack.trials")
    missing = _consume(env, env.roles["consumer"], "trials")
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.strip().splitlines() == [
        f"sntrack: queue sntrack.trials does not exist in vhost '{env.vhost}'; an administrator declares it with "
        "`sntrack topology apply`"]
    wrong_role = _consume(env, env.roles["subscriber"], "journal")
    assert wrong_role.returncode == 2, wrong_role.stderr
    [line] = wrong_role.stderr.strip().splitlines()
    assert "ACCESS_REFUSED" in line and "sntrack.journal" in line and "consumer role" in line, line


async def test_topology_apply_names_users_by_prefix_and_sets_passwords_from_the_environment(env):
    prefix = f"{env.vhost}-cli"

    def apply(extra: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sntrack", "topology", "apply", "--vhost", env.vhost,
                               "--user-prefix", prefix], env={**cli_env(env), **extra},
                              capture_output=True, text=True, timeout=60)

    try:
        run = apply({"SNTRACK_SUBSCRIBER_PASSWORD": "subscriber-secret"})
        assert run.returncode == 0, run.stderr
        assert f"ok  user {prefix}-subscriber (password set)" in run.stdout
        assert f"ok  user {prefix}-worker (no password: it cannot log in until one is set)" in run.stdout
        permissions = {p["user"]: p for p in env.api.request("GET", f"vhosts/{env.vhost}/permissions")}
        for role, expected in ROLE_PERMISSIONS.items():
            assert {k: permissions[user_name(role, prefix)][k] for k in expected} == expected
        # Applied again without the variable, the existing user keeps its password.
        again = apply({})
        assert again.returncode == 0 and "password set" not in again.stdout, again.stdout + again.stderr
        connection = await aio_pika.connect(
            with_login(env.settings.amqp_url, user_name("subscriber", prefix), "subscriber-secret"))
        await connection.close()
    finally:
        delete_users(env.api, prefix)
    assert not [u for u in env.api.request("GET", "users") if u["name"].startswith(prefix)]


async def test_users_without_password_cannot_log_in(env):
    prefix = f"{env.vhost}-nopw"
    apply_topology(env.api, env.vhost, user_prefix=prefix)
    try:
        with pytest.raises((aio_pika.exceptions.ProbableAuthenticationError, ConnectionError)):
            connection = await aio_pika.connect(with_login(env.settings.amqp_url, user_name("worker", prefix), ""))
            await connection.close()
    finally:
        delete_users(env.api, prefix)
