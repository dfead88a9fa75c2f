"""The HTTP gateway against the real broker, database and consumers: the same gate, confirms before 202, tokens."""

import ast
import asyncio
import contextlib
import dataclasses
import json
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import pytest
from aiormq.exceptions import ChannelAccessRefused

import gateway as gateway_package
from consumers.registry import QUEUES
from consumers.service import running_consumers
from gateway.client import GatewayClient
from gateway.openapi import SCHEMA_FILES
from gateway.ratelimit import RateLimiter
from gateway.server import running_gateway
from gateway.tokens import add_token, revoke_token, split_token
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas import DEAD_LETTER_EXCHANGE, EXCHANGE
from sntrack.commands.gateway import gateway_config
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.test_contract import INVALID, body, changed
from tests.test_end_to_end import cli_env
from tests.test_poison import GATE_LIMIT, _poison

PRODUCER = "notebook-alice"
NDJSON = {"Content-Type": "application/x-ndjson"}


async def new_token(env, producer_id: str = PRODUCER) -> tuple[str, str]:
    conn = await env.db()
    try:
        return await add_token(conn, producer_id)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def gateway(env, **changes):
    config = dataclasses.replace(gateway_config(env.settings), **{"confirm_timeout_s": 3.0, **changes})
    async with running_gateway(config) as url, aiohttp.ClientSession() as session:
        yield url, session


async def post(session, url: str, data, token: str | None, headers: dict | None = None):
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(f"{url}/v1/events", data=data, headers={**auth, **(headers or {})}) as response:
        return response.status, response.headers, await response.json(content_type=None)


def ndjson(events) -> bytes:
    return b"\n".join(e.to_json() for e in events)


async def queue_depths(env) -> dict[str, int]:
    """Messages in every consumer queue and dead-letter queue, read exactly (passive declare), not from stats."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel()
        depths = {}
        for spec in QUEUES:
            for name in (spec.name, spec.dead_letter_queue):
                queue = await channel.declare_queue(name, passive=True)
                depths[name] = queue.declaration_result.message_count
        return depths
    finally:
        await connection.close()


async def test_good_events_land_exactly_once_including_retries(env):
    _, token = await new_token(env)
    study = synthetic_study(12, 4, producer=producer_info("claimed-by-client"), seed=5)
    events = [e for trial in study for e in trial]
    async with gateway(env) as (url, session), running_consumers(env.settings.consumer(), ["journal", "trials"]):
        client = GatewayClient(url, token)
        for start in range(0, len(events), 20):
            assert await asyncio.to_thread(client.send, events[start:start + 20]) == \
                [str(e.event_id) for e in events[start:start + 20]]
        # Retries with the same ids, in the other shapes: a JSON array, and single events.
        array = b"[" + b",".join(e.to_json() for e in events[:30]) + b"]"
        status, _, answer = await post(session, url, array, token, {"Content-Type": "application/json"})
        assert status == 202 and answer["accepted"] == 30
        for event in events[-5:]:
            status, headers, _ = await post(session, url, event.to_json(), token)
            assert status == 202
            # Each 202 says where its time went in the gateway: the gate, then awaiting the broker's confirm.
            assert re.fullmatch(r"gate;dur=\d+\.\d{3}, confirm;dur=\d+\.\d{3}", headers["Server-Timing"])
        notebook_trial = await asyncio.to_thread(
            client.report_trial, "notebook-search", spectral_norm=True, hyperparams={"lr": 0.01},
            curve=[{"val_accuracy": 0.5}, {"val_accuracy": 0.75}])
        total = len(events) + 4
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", total), what="journal")
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'", total), what="trials")

    journal = await env.fetch("SELECT event_id, envelope FROM events")
    assert sorted(str(r["event_id"]) for r in journal) != [] and len(journal) == total
    assert {str(e.event_id) for e in events} <= {str(r["event_id"]) for r in journal}
    # The token's producer id is stamped over whatever the client claimed.
    assert {json.loads(r["envelope"])["producer"]["worker_id"] for r in journal} == {PRODUCER}
    trials = {r["id"]: r for r in await env.fetch("SELECT id, status, spectral_norm FROM trials")}
    assert len(trials) == 13
    for trial in study:
        assert trials[trial[0].trial_id]["status"] == trial[-1].payload.status
    assert trials[notebook_trial]["status"] == "completed" and trials[notebook_trial]["spectral_norm"] is True


def _poisons(good) -> list[tuple[str, bytes, int, str]]:
    """(name, body, HTTP status, gate reason): the poison messages of the contract and poison tests."""
    cases = [(f"poison {name}", raw, {"invalid_json": 400, "nan": 400, "too_large": 413}.get(name, 422),
              "invalid_json" if name == "nan" else name) for name, raw in _poison(good).items()]
    cases += [(name, body(changed(doc, path, value)), 422, "invalid_event") for name, doc, path, value in INVALID]
    cases += [("array of a number", b"[1]", 400, "invalid_json"), ("not json", b"{oops", 400, "invalid_json")]
    return cases


async def test_every_poison_message_gets_its_4xx_and_nothing_reaches_the_broker(env):
    _, token = await new_token(env)
    good = [e for trial in synthetic_study(1, 2, producer=producer_info(), seed=3) for e in trial]
    metric = next(e for e in good if e.event_type == "ml.run.metric")
    # The poison tests' too_large body is sized against their small gate limit (it must fit the broker's).
    async with gateway(env, max_event_bytes=GATE_LIMIT) as (url, session):
        for name, raw, expected, reason in _poisons(metric):
            status, _, answer = await post(session, url, raw, token)
            assert (status, [r["reason"] for r in answer["rejected"]]) == (expected, [reason]), name
            assert answer["rejected"][0]["detail"], name
        # In a batch, every refused event is named by its index, and the good ones are not published either.
        unknown = _poison(metric)["unknown_type"]
        status, _, answer = await post(session, url, b"\n".join([good[0].to_json(), unknown, good[1].to_json(),
                                                                 b"{oops"]), token, NDJSON)
        assert status == 400
        assert [(r["index"], r["reason"]) for r in answer["rejected"]] == [(1, "unknown_type"), (3, "invalid_json")]
        assert set((await queue_depths(env)).values()) == {0}
        # The depth check sees what the gateway publishes: a good stop event shows up in every consumer queue.
        assert (await post(session, url, good[-1].to_json(), token))[0] == 202
        depths = await queue_depths(env)
        assert {n: d for n, d in depths.items() if not n.endswith(".dlq")} == {s.name: 1 for s in QUEUES}


async def test_broker_cut_mid_stream_answers_503_and_nothing_is_lost_after_retries(env):
    _, token = await new_token(env)
    events = [e for trial in synthetic_study(30, 4, producer=producer_info(), seed=9) for e in trial]
    broker = urlsplit(env.settings.amqp_url)
    with TcpProxy(broker.hostname, broker.port or 5672) as proxy:
        async with gateway(env, amqp_url=proxy.url_for(env.settings.amqp_url)) as (url, session), \
                running_consumers(env.settings.consumer(), ["journal"]):
            assert (await post(session, url, ndjson(events[:6]), token, NDJSON))[0] == 202
            proxy.cut()
            status, headers, answer = await post(session, url, ndjson(events[6:12]), token, NDJSON)
            assert status == 503 and headers["Retry-After"] == "1", answer
            async with session.get(f"{url}/healthz") as response:
                assert response.status == 503
            proxy.restore()

            # A stream of batches; the line is cut while it runs; the client retries each batch until 202.
            client = GatewayClient(url, token, attempts=60)
            acknowledged: list[str] = []

            def stream() -> None:
                for start in range(6, len(events), 6):
                    acknowledged.extend(client.send(events[start:start + 6]))

            streaming = asyncio.create_task(asyncio.to_thread(stream))
            await wait_until(lambda: len(acknowledged) >= 24, what="a few batches acknowledged")
            proxy.cut()
            await asyncio.sleep(1.5)  # a batch confirmed just before the cut may still be answered 202
            cut_at = len(acknowledged)
            await asyncio.sleep(2.5)
            assert len(acknowledged) == cut_at, "nothing is acknowledged while the broker is unreachable"
            proxy.restore()
            await streaming
            await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
    assert 'route="/v1/events",code="503"' in metrics
    assert acknowledged == [str(e.event_id) for e in events[6:]]
    journal = await env.fetch("SELECT event_id FROM events")
    assert sorted(str(r["event_id"]) for r in journal) == sorted(str(e.event_id) for e in events)


async def test_wrong_revoked_and_missing_tokens_get_401_or_403(env):
    token_id, token = await new_token(env)
    _, other = await new_token(env, "someone-else")
    event = next(iter(synthetic_study(1, 1, producer=producer_info(), seed=1)))[0].to_json()
    wrong_secret = f"sntk_{token_id}_{secrets.token_urlsafe(32)}"
    unknown_id = f"sntk_{secrets.token_hex(6)}_{token.split('_', 2)[2]}"
    async with gateway(env, token_cache_s=0.5) as (url, session):
        assert (await post(session, url, event, None))[0] == 401
        assert (await post(session, url, event, "not-a-token"))[0] == 401
        assert (await post(session, url, event, None, {"Authorization": f"Basic {token}"}))[0] == 401
        assert (await post(session, url, event, wrong_secret))[0] == 403
        assert (await post(session, url, event, unknown_id))[0] == 403
        assert (await post(session, url, event, token))[0] == 202
        conn = await env.db()
        try:
            assert await revoke_token(conn, token_id)
            assert not await revoke_token(conn, "000000000000")
        finally:
            await conn.close()

        async def refused() -> bool:
            status, _, answer = await post(session, url, event, token)
            return status == 403 and answer["error"] == "token revoked"

        await wait_until(refused, timeout=10, what="the revoked token refused")
        assert (await post(session, url, event, other))[0] == 202


async def test_a_token_in_use_is_refreshed_without_holding_requests(env):
    """Once a token's cache entry is half its life old the gateway looks it up again in the background: with that
    lookup stuck behind a lock on gateway_tokens, the token's requests are still answered 202 (a request that
    waited for it would get 503 after the lookup's timeout)."""
    _, token = await new_token(env)
    event = next(iter(synthetic_study(1, 1, producer=producer_info(), seed=1)))[0].to_json()
    async with gateway(env, token_cache_s=4.0) as (url, session):
        assert (await post(session, url, event, token))[0] == 202  # looked up and cached
        conn = await env.db()
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE gateway_tokens IN ACCESS EXCLUSIVE MODE")

                async def refresh_stuck() -> bool:
                    assert (await post(session, url, event, token))[0] == 202
                    return await env.fetchval(
                        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%FROM gateway_tokens%'")

                await wait_until(refresh_stuck, timeout=3.5, what="a background lookup waiting for the lock")
                assert (await post(session, url, event, token))[0] == 202
        finally:
            await conn.close()


async def test_database_away_answers_503_not_403(env):
    _, token = await new_token(env)
    event = next(iter(synthetic_study(1, 1, producer=producer_info(), seed=1)))[0].to_json()
    database = urlsplit(env.settings.database_url)
    with TcpProxy(database.hostname, database.port or 5432) as proxy:
        async with gateway(env, database_url=proxy.url_for(env.settings.database_url), token_cache_s=0) \
                as (url, session):
            assert (await post(session, url, event, token))[0] == 202
            proxy.cut()
            status, headers, answer = await post(session, url, event, token)
            assert (status, headers["Retry-After"]) == (503, "1"), answer
            proxy.restore()
            await wait_until(lambda: _accepted(session, url, event, token), timeout=30, what="lookups again")


async def _accepted(session, url, event, token) -> bool:
    return (await post(session, url, event, token))[0] == 202


async def test_rate_and_size_limits(env):
    _, token = await new_token(env)
    event = next(iter(synthetic_study(1, 1, producer=producer_info(), seed=1)))[0].to_json()
    async with gateway(env, rate_per_s=0.2, burst=3, max_request_bytes=4096) as (url, session):
        assert (await post(session, url, b"x" * 5000, token))[0] == 413  # by Content-Length

        async def chunks():
            for _ in range(5):
                yield b"y" * 1000

        assert (await post(session, url, chunks(), token))[0] == 413  # chunked: counted while reading
        assert (await post(session, url, event, token))[0] == 202
        status, headers, _ = await post(session, url, event, token)
        assert status == 429 and int(headers["Retry-After"]) >= 1


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.take("a") for _ in range(4)] == [0, 0, 0, 1]
    assert limiter.take("b") == 0  # per token
    now[0] += 0.5
    assert limiter.take("a") == 0 and limiter.take("a") == 1


def test_tokens_are_recognised_by_shape():
    assert split_token("sntk_0123456789ab_" + "s" * 43) == ("0123456789ab", "s" * 43)
    for bad in ("", "sntk", "sntk_short_" + "s" * 43, "abcd_0123456789ab_" + "s" * 43, "sntk_0123456789ab_short"):
        assert split_token(bad) is None


async def test_health_metrics_and_openapi_referencing_the_json_schemas(env):
    _, token = await new_token(env)
    async with gateway(env) as (url, session):
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200 and (await response.json())["broker"] == "connected"
        await post(session, url, b"{oops", token)
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        assert 'sntrack_gateway_events_rejected_total{reason="invalid_json"} 1' in text
        assert "sntrack_gateway_broker_connected 1" in text
        async with session.get(f"{url}/openapi.json") as response:
            spec = await response.json()
        ref = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert ref["oneOf"][0]["$ref"] == "/schemas/event.schema.json"
        async with session.get(f"{url}/schemas/event.schema.json") as response:
            assert await response.read() == (SCHEMA_FILES / "event.schema.json").read_bytes()
        async with session.get(f"{url}/schemas/..%2Fgate.py") as response:
            assert response.status == 404


async def test_gateway_user_may_only_publish_to_ml_events(env):
    _, token = await new_token(env)
    amqp_url = env.roles["gateway"]
    event = next(iter(synthetic_study(1, 1, producer=producer_info(), seed=1)))[0].to_json()
    async with gateway(env, amqp_url=amqp_url) as (url, session):
        assert (await post(session, url, event, token))[0] == 202
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await (await channel.get_exchange(EXCHANGE, ensure=False)).publish(
            aio_pika.Message(b"{}"), routing_key="ml.run.start")
        with pytest.raises(ChannelAccessRefused):
            await (await channel.get_queue(QUEUES[0].name, ensure=False)).get(fail=False)
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelAccessRefused):
            await (await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)).publish(
                aio_pika.Message(b"{}"), routing_key=QUEUES[0].name)
    finally:
        await connection.close()


def _cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", "gateway", *args], env=cli_env(env),
                          capture_output=True, text=True, timeout=60)


def test_token_commands_add_list_revoke(env):
    added = _cli(env, "token", "add", "cluster-7")
    assert added.returncode == 0, added.stderr
    token = added.stdout.splitlines()[-1]
    token_id = split_token(token)[0]
    listed = _cli(env, "token", "list").stdout
    assert token_id in listed and "cluster-7" in listed and token not in listed  # the secret is never shown again
    assert _cli(env, "token", "revoke", token_id).returncode == 0
    assert [line.split()[-1] != "-" for line in _cli(env, "token", "list").stdout.splitlines()[1:]] == [True]
    missing = _cli(env, "token", "revoke", "000000000000")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    bad = _cli(env, "token", "add", "")
    assert bad.returncode == 2 and "invalid producer id" in bad.stderr


def test_the_command_serves_until_sigterm(env):
    """`sntrack gateway` builds its config from SNTRACK_* and serves /healthz until SIGTERM ends it cleanly."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "sntrack", "gateway", "--port", str(port)], env=cli_env(env),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "the gateway never answered /healthz"
                time.sleep(0.2)
    finally:
        server.terminate()
        assert server.wait(timeout=30) == 0, server.stderr.read()


def test_busy_port_is_one_line(env):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        run = _cli(env, "--port", str(busy.getsockname()[1]))
    assert run.returncode == 2 and "cannot listen on" in run.stderr and run.stderr.count("\n") == 1


def test_gateway_imports_no_consumer_and_the_client_needs_only_schemas():
    for path in Path(gateway_package.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in imported if m.split(".")[0] in ("consumers", "sntrack")}, path.name
    loaded = subprocess.run([sys.executable, "-c", "import sys, gateway.client; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True).stdout.split()
    assert not {m.split(".")[0] for m in loaded} & {"aio_pika", "aiohttp", "asyncpg", "starlette", "uvicorn",
                                                     "consumers", "sntrack", "torch"}
