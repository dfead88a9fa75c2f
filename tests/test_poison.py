"""Bad input is dead-lettered with its reason; every good message around it is applied; nobody stops."""

import json

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import REASON_HEADER
from tests.conftest import wait_until

GATE_LIMIT = 256 * 1024

# Trial 'refused-trial' fails in the trials projection (an error PostgreSQL raises, not a bad message).
_REFUSE_TRIGGER = """
    CREATE FUNCTION refuse_trial() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.id = 'refused-trial' THEN RAISE EXCEPTION 'refused by the test trigger'; END IF;
        RETURN NEW;
    END $$;
    CREATE TRIGGER refuse_trial BEFORE INSERT ON trials FOR EACH ROW EXECUTE FUNCTION refuse_trial();
"""


async def refuse_one_trial(env) -> None:
    conn = await env.db()
    try:
        await conn.execute(_REFUSE_TRIGGER)
    finally:
        await conn.close()


def _poison(good_event) -> dict[str, bytes]:
    doc = json.loads(good_event.to_json())
    unknown = {**doc, "event_type": "ml.run.pause"}
    missing = {k: v for k, v in doc.items() if k != "trial_id"}
    future = {**doc, "schema_version": 99}
    nan = json.dumps(doc).replace('"epoch": 0', '"epoch": NaN')
    assert "NaN" in nan
    # Beyond the gate's limit (GATE_LIMIT in the test below) yet within the broker's max_message_size, which
    # infra/services.sh sets to the gate's default limit: a larger body is refused at publish already.
    huge = {**doc, "payload": {**doc["payload"], "measurements": {"blob": 1.0}}, "pad": "x" * 2 * GATE_LIMIT}
    return {
        "invalid_json": b"\x00\x01 not json at all \xff",
        "unknown_type": json.dumps(unknown).encode(),
        "invalid_event": json.dumps(missing).encode(),
        "unsupported_schema_version": json.dumps(future).encode(),
        "nan": nan.encode(),
        "too_large": json.dumps(huge).encode(),
    }


async def test_poison_messages_go_to_dead_letters_and_good_ones_are_applied(env):
    study = synthetic_study(30, 5, producer=producer_info(), seed=11)
    good = [e for trial in study for e in trial]
    poison = _poison(next(e for e in good if e.event_type == "ml.run.metric"))
    settings = env.settings.replace(max_message_bytes=GATE_LIMIT)
    async with running_consumers(settings.consumer(), ["journal", "trials"]) as runtimes:
        third = len(good) // 3
        await env.publish_events(good[:third])
        await env.publish_raw(list(poison.values()))
        await env.publish_events(good[third:2 * third])
        await env.publish_raw(list(poison.values()))
        await env.publish_events(good[2 * third:])
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(good)), what="journal")
        await wait_until(lambda: env.fetchval("SELECT count(*) = 30 FROM trials WHERE status <> 'running'"))
        assert [r.stats.dead_lettered for r in runtimes] == [2 * len(poison)] * 2
        assert [r.stats.handled for r in runtimes] == [len(good)] * 2

    assert await env.fetchval("SELECT count(*) FROM applied_events WHERE projection = 'trials'") == len(good)
    for queue in ("sntrack.journal", "sntrack.trials"):
        letters = await env.dead_letters(queue)
        reasons = sorted(m.headers[REASON_HEADER] for m in letters)
        expected = sorted(["invalid_json"] * 4 + ["unknown_type", "invalid_event",
                                                  "unsupported_schema_version", "too_large"] * 2)
        # NaN is refused by the JSON parser, so it is reported as invalid_json.
        assert reasons == expected, queue
        assert all(m.headers["x-sntrack-detail"] for m in letters)


async def test_event_the_database_refuses_is_dead_lettered_as_handler_error(env):
    # Valid by the contract, but refused by the database every time (the contract itself refuses what the store
    # cannot hold, tests/test_gate_store_limits.py, so a trigger stands in for such a failure). The runtime
    # isolates it from its batch, retries it a few times, then dead-letters it with the reason.
    study = synthetic_study(4, 3, producer=producer_info(), seed=5)
    good = [e for trial in study for e in trial]
    bad = json.loads(good[0].to_json())
    bad["event_id"] = "01939a3c-1d2e-7f00-8000-00000000dead"
    bad["trial_id"] = "refused-trial"
    await refuse_one_trial(env)
    async with running_consumers(env.settings.consumer(), ["trials"]):
        await env.publish_events(good[:5])
        await env.publish_raw([json.dumps(bad).encode()], routing_key="ml.run.start")
        await env.publish_events(good[5:])
        await wait_until(lambda: env.fetchval("SELECT count(*) = 4 FROM trials WHERE status <> 'running'"))
        await wait_until(lambda: env.queue_depth("sntrack.trials.dlq") == 1, timeout=60, what="dead letter")
    letters = await env.dead_letters("sntrack.trials")
    assert len(letters) == 1 and json.loads(letters[0].body)["trial_id"] == "refused-trial"
    assert letters[0].headers[REASON_HEADER] == "handler_error"
    assert "refused by the test trigger" in letters[0].headers["x-sntrack-detail"]
    assert await env.fetchval("SELECT count(*) FROM applied_events") == len(good)
