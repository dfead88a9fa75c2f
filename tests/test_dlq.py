"""`sntrack dlq`: reading leaves dead letters in place, requeue sends them through the gate again and loses nothing
when cut half-way, purge asks first."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import aio_pika

from consumers import dead_letters as dl
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import DEAD_LETTER_EXCHANGE, DETAIL_HEADER, REASON_HEADER
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.test_end_to_end import cli_env
from tests.test_poison import refuse_one_trial
from tests.test_studies import sntrack


async def _depth(env, queue: str) -> int:
    """Ready messages now (a passive declare: the management API's figures lag by seconds)."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        return await dl.depth(connection, queue)
    finally:
        await connection.close()


async def _peek(env, queue: str) -> list[dl.DeadLetterInfo]:
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        return await dl.peek(connection, queue, dl.Selection())
    finally:
        await connection.close()


async def _dead_letter(env, bodies: list[bytes], reason: str, queue: str = "sntrack.trials") -> None:
    """Put messages into `<queue>.dlq` the way the runtime does (through the dead-letter exchange, with reason)."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        for body in bodies:
            await dlx.publish(aio_pika.Message(body, headers={REASON_HEADER: reason, DETAIL_HEADER: f"test {reason}"},
                                               delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=queue)
    finally:
        await connection.close()


async def test_requeue_applies_a_fixed_message_and_a_still_bad_one_returns_with_its_reason(env):
    good = [e for t in synthetic_study(2, 2, producer=producer_info(), seed=3) for e in t]
    refused = json.loads(good[0].to_json()) | {"event_id": "01939a3c-1d2e-7f00-8000-00000000dead",
                                               "trial_id": "refused-trial"}
    await refuse_one_trial(env)
    async with running_consumers(env.settings.consumer(), ["trials"]):
        await env.publish_events(good)
        await env.publish_raw([json.dumps(refused).encode()], routing_key="ml.run.start")
        await env.publish_raw([b"{not json"], routing_key="ml.run.metric")
        await wait_until(lambda: env.fetchval("SELECT count(*) = 2 FROM trials"), what="the good trials")
        await wait_until(lambda: _two(env), timeout=60, what="both dead letters")

        listed = sntrack(env, "dlq", "list", "trials")
        assert listed.returncode == 0, listed.stderr
        assert "sntrack.trials.dlq: 2 dead letters" in listed.stdout
        assert "handler_error" in listed.stdout and "invalid_json" in listed.stdout
        assert "01939a3c-1d2e-7f00-8000-00000000dead" in listed.stdout
        assert await _depth(env, "sntrack.trials.dlq") == 2  # reading took nothing
        shown = sntrack(env, "dlq", "show", "sntrack.trials", "--reason", "handler_error")
        assert shown.returncode == 0, shown.stderr
        assert "refused by the test trigger" in shown.stdout and '"trial_id": "refused-trial"' in shown.stdout
        assert "invalid_json" not in shown.stdout

        conn = await env.db()
        try:
            await conn.execute("DROP TRIGGER refuse_trial ON trials")  # the cause is fixed
        finally:
            await conn.close()
        requeued = sntrack(env, "dlq", "requeue", "trials")
        assert requeued.returncode == 0, requeued.stderr
        assert "sntrack.trials.dlq: requeued 2 to sntrack.trials" in requeued.stdout
        await wait_until(lambda: env.fetchval("SELECT count(*) = 1 FROM trials WHERE id = 'refused-trial'"),
                         what="the fixed message applied")
        await wait_until(lambda: _depth(env, "sntrack.trials.dlq"), timeout=30, what="the bad one back")
    [back] = await _peek(env, "sntrack.trials.dlq")
    assert (back.reason, back.requeued, back.previous_reason, back.body) == ("invalid_json", 1, "invalid_json",
                                                                              b"{not json")
    assert back.consumer == "trials" and back.detail


async def _all_there(env, n: int) -> tuple[int, int] | None:
    """(in the queue, in the dead-letter queue) once together they hold at least n messages."""
    moved, left = await _depth(env, "sntrack.trials"), await _depth(env, "sntrack.trials.dlq")
    return (moved, left) if moved + left >= n else None


async def _no_dlq_connection(env) -> bool:
    listed = env.api.request("GET", f"vhosts/{env.vhost}/connections") or []
    return not any(c.get("client_properties", {}).get("connection_name") == "sntrack-dlq" for c in listed)


async def _settled(env, n: int) -> tuple[int, int] | None:
    """_all_there, the same twice a second apart."""
    first = await _all_there(env, n)
    await asyncio.sleep(1)
    return first if first and first == await _all_there(env, n) else None


async def _two(env) -> bool:
    return await _depth(env, "sntrack.trials.dlq") == 2


async def test_requeue_cut_half_way_loses_nothing(env):
    events = [e for t in synthetic_study(60, 8, producer=producer_info(), seed=4) for e in t]
    await _dead_letter(env, [e.to_json() for e in events], "handler_error")
    assert await _depth(env, "sntrack.trials.dlq") == len(events)
    with TcpProxy("127.0.0.1", 5672) as proxy:
        proxy.delay_s = 0.01  # every answer of the broker is slow: the requeue takes seconds
        environ = {**cli_env(env), "SNTRACK_AMQP_URL": proxy.url_for(env.settings.amqp_url)}
        run = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", "dlq", "requeue", "trials",
                                                   env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            await wait_until(lambda: _depth(env, "sntrack.trials"), timeout=60, what="the first copies")
            proxy.cut()
            out, err = (s.decode() for s in await asyncio.wait_for(run.communicate(), timeout=60))
        finally:
            if run.returncode is None:
                run.kill()
    assert run.returncode == 2 and "lost the connection to RabbitMQ" in err, (out, err)
    assert err.strip().count("\n") == 0
    # The broker hands the unconfirmed dead letters back once it has seen the connection go. Copies in both places
    # can make the count whole before the last of them are back: wait for the connection to go and the count to settle.
    await wait_until(lambda: _no_dlq_connection(env), what="the broker to drop the cut connection")
    moved, left = await wait_until(lambda: _settled(env, len(events)), what="every event somewhere")
    assert 0 < moved < len(events), (moved, left)  # cut half-way; a copy may be in both places

    async with running_consumers(env.settings.consumer(), ["trials"]) as (consumer,):
        rest = sntrack(env, "dlq", "requeue", "trials")
        assert rest.returncode == 0, rest.stderr
        ids = [e.event_id for e in events]
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials' AND event_id = ANY($2::uuid[])",
            len(ids), ids), what="every event applied", timeout=90)
        # The copies requeued twice (in both places after the cut) are duplicates: applied as no-ops, then acked.
        await wait_until(lambda: _drained(env, consumer, "sntrack.trials"), what="the duplicates to be acked",
                         timeout=60)
        # At least once: copies of events already applied can still surface in the dead-letter queue after the
        # second requeue (seen: 7 to 102 of 600 with "requeued 549" reported; cause not established). Each one is a
        # copy of an applied event, and requeueing again applies nothing twice.
        extra = await _peek(env, "sntrack.trials.dlq")
        assert {info.event_id for info in extra} <= {str(i) for i in ids}
        if extra:
            assert sntrack(env, "dlq", "requeue", "trials").returncode == 0
            await wait_until(lambda: _drained(env, consumer, "sntrack.trials"), what="the last copies to be acked",
                             timeout=60)
    assert await env.fetchval("SELECT count(*) FROM applied_events WHERE projection = 'trials'") == len(ids)
    assert await env.fetchval("SELECT count(*) FROM trials WHERE status <> 'running'") == 60
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == sum(e.event_type == "ml.run.metric"
                                                                             for e in events)
    assert await _depth(env, "sntrack.trials.dlq") == 0 and await _depth(env, "sntrack.trials") == 0


async def test_requeue_refused_half_way_keeps_what_was_not_confirmed(env):
    """The original queue refuses copies once full: each one the broker did not confirm stays a dead letter."""
    events = [e for t in synthetic_study(30, 8, producer=producer_info(), seed=6) for e in t]
    await _dead_letter(env, [e.to_json() for e in events], "handler_error")
    policy = f"policies/{env.vhost}/full-trials-queue"
    env.api.request("PUT", policy, {"pattern": r"^sntrack\.trials$", "apply-to": "queues",
                                    "definition": {"max-length": 100}})
    await wait_until(lambda: (env.api.request("GET", f"queues/{env.vhost}/sntrack.trials") or {}).get(
        "effective_policy_definition"), what="the policy applied")
    refused = sntrack(env, "dlq", "requeue", "trials")
    assert refused.returncode == 1 and "refused the copy for sntrack.trials" in refused.stderr, refused.stderr
    moved, left = await wait_until(lambda: _all_there(env, len(events)), what="every event somewhere")
    assert f"requeued {moved} to sntrack.trials" in refused.stdout
    # Nothing lost. An event may be in both places: in one fresh-clone run 11 were (124 + 166 of 279; cause not
    # established). At least once, as `dlq --help` says; the event-id dedupe applies each once, checked below.
    assert 0 < moved < len(events) and moved + left >= len(events)
    env.api.request("DELETE", policy)

    async with running_consumers(env.settings.consumer(), ["trials"]):
        rest = sntrack(env, "dlq", "requeue", "trials")
        assert rest.returncode == 0 and f"requeued {left} to" in rest.stdout, rest.stderr
        ids = [e.event_id for e in events]
        await wait_until(lambda: env.fetchval(
            "SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials' AND event_id = ANY($2::uuid[])",
            len(ids), ids), what="every event applied", timeout=90)


def _purge(env, *args: str, answer: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", "dlq", "purge", *args], env=cli_env(env),
                          input=answer, stdin=subprocess.DEVNULL if answer is None else None,
                          capture_output=True, text=True, timeout=120)


async def test_purge_asks_for_confirmation_unless_yes(env):
    await _dead_letter(env, [b"{bad 1", b"{bad 2"], "invalid_json")
    await _dead_letter(env, [b'{"unknown": 1}'], "unknown_type")
    declined = _purge(env, "trials", answer="n\n")
    assert declined.returncode == 1 and "delete 3 dead letters for good" in declined.stderr
    assert await _depth(env, "sntrack.trials.dlq") == 3
    accepted = _purge(env, "trials", "--reason", "invalid_json", answer="y\n")
    assert accepted.returncode == 0 and "sntrack.trials.dlq: purged 2" in accepted.stdout, accepted.stderr
    [kept] = await _peek(env, "sntrack.trials.dlq")
    assert kept.reason == "unknown_type"
    forced = _purge(env, "--yes", answer=None)  # every dead-letter queue, no question asked
    assert forced.returncode == 0 and "sntrack.trials.dlq: purged 1" in forced.stdout, forced.stderr
    assert "[y/N]" not in forced.stderr
    assert await _depth(env, "sntrack.trials.dlq") == 0


async def test_dlq_errors_are_one_line(env):
    missing = sntrack(env, "dlq", "list", "nosuch")
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "sntrack: no dead-letter queue nosuch.dlq in this vhost")
    bad_limit = sntrack(env, "dlq", "list", "--limit", "0")
    assert bad_limit.returncode == 2 and bad_limit.stderr.count("\n") == 1


async def _empty(env, queue: str) -> bool:
    return await _depth(env, queue) == 0


async def _drained(env, consumer, queue: str) -> bool:
    """No message ready in `queue` and none in the consumer's hands. A passive declare counts only ready messages:
    delivered ones wait unacked in the consumer's prefetch, and go back to the queue if it stops then (seen: 13 left
    after a stop). So: nothing ready, and the consumer handles nothing more for a second."""
    handled = consumer.stats.handled
    if not await _empty(env, queue):
        return False
    await asyncio.sleep(1)
    return consumer.stats.handled == handled and await _empty(env, queue)


async def test_a_dead_letter_with_malformed_counting_headers_is_listed_not_a_traceback(env):
    """Headers travel with a message from whoever published it: one non-numeric x-sntrack-requeued or x-death count
    must not make every `sntrack dlq` action on the queue crash."""
    connection = await aio_pika.connect(env.settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE, ensure=False)
        await dlx.publish(aio_pika.Message(b'{"event_id": "odd-headers"}', headers={
            REASON_HEADER: "handler_error", dl.REQUEUED_HEADER: "many",
            "x-death": [{"count": "zz", "queue": "sntrack.trials"}]}), routing_key="sntrack.trials")
    finally:
        await connection.close()
    for action in ("list", "show"):
        run = sntrack(env, "dlq", action, "trials")
        assert run.returncode == 0 and "odd-headers" in run.stdout, run.stderr
    [info] = await _peek(env, "sntrack.trials.dlq")
    assert (info.requeued, info.deaths[0].count) == (0, 0)  # x-delivery-count: the quorum queue sets its own


async def test_a_queue_name_amqp_cannot_carry_is_one_line(env):
    for name in ("a" * 300, "x'y", "a\x01b"):
        run = sntrack(env, "dlq", "list", name)
        assert run.returncode == 2 and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
