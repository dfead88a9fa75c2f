"""Values PostgreSQL cannot store are refused at the gate by every consumer alike (issue 8, item 9).

Before, they passed the gate: journal and trials dead-lettered them as handler_error, while comparison (which stores
neither the strings nor the integers) counted the stop, so sn_comparison differed from a replay of the journal.
"""

import json
import uuid

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import REASON_HEADER
from tests.conftest import wait_until
from tests.test_contract import changed

CONSUMERS = ("journal", "trials", "comparison")


def unstorable(good) -> list[dict]:
    """One document per value the store cannot hold, each a fresh event of a fresh trial."""
    start, metric, stop = (json.loads(next(e for e in good if e.event_type == t).to_json())
                           for t in ("ml.run.start", "ml.run.metric", "ml.run.stop"))
    failed = changed(stop, ["payload", "status"], "failed")
    failed["payload"]["error"] = {"type": "exception", "message": "CUDA error\u0000"}
    docs = [
        changed(stop, ["trial_id"], "nul\u0000trial"),
        changed(stop, ["model_run_id"], "search\u0000"),
        changed(stop, ["producer", "host"], "host\u0000"),
        changed(stop, ["payload", "measurements", "val\u0000"], 0.5),
        changed(stop, ["seq"], 2**31),
        changed(stop, ["producer", "pid"], 2**31),
        changed(stop, ["occurred_at"], "0001-01-01T00:00:00+01:00"),
        failed,
        changed(metric, ["seq"], 2**31),
        changed(metric, ["payload", "epoch"], 2**31),
        changed(metric, ["payload", "spectral_norms", "layer\u0000"], 1.0),
        changed(start, ["payload", "optuna_trial_number"], 2**31),
        changed(start, ["payload", "seed"], 2**63),
        changed(start, ["payload", "hyperparams", "hidden"], 2**63),
        changed(start, ["payload", "hyperparams", "epochs"], 2**31),
        changed(start, ["payload", "hyperparams", "opt\u0000"], "adam"),
        changed(start, ["payload", "dataset"], "digits\u0000"),
        changed(start, ["occurred_at"], "9999-12-31T23:30:00-01:00"),
    ]
    for number, doc in enumerate(docs):
        doc["event_id"] = str(uuid.uuid4())
        if "\u0000" not in doc["trial_id"]:
            doc["trial_id"] = f"unstorable-{number}"
    return docs


async def test_unstorable_values_are_gate_rejections_for_every_consumer(env):
    study = synthetic_study(12, 4, producer=producer_info(), seed=21)
    good = [e for trial in study for e in trial]
    bad = unstorable(good)
    bad_stops = sum(doc["event_type"] == "ml.run.stop" for doc in bad)
    stops = sum(e.event_type == "ml.run.stop" for e in good)
    async with running_consumers(env.settings, CONSUMERS):
        half = len(good) // 2
        await env.publish_events(good[:half])
        for doc in bad:
            await env.publish_raw([json.dumps(doc).encode()], routing_key=doc["event_type"])
        await env.publish_events(good[half:])
        for projection, expected in (("journal", len(good)), ("trials", len(good)), ("comparison", stops)):
            await wait_until(lambda p=projection, n=expected: env.fetchval(
                "SELECT count(*) = $2 FROM applied_events WHERE projection = $1", p, n), what=f"{projection}")
        for queue, expected in (("journal", len(bad)), ("trials", len(bad)), ("comparison", bad_stops)):
            await wait_until(lambda q=f"sntrack.{queue}.dlq", n=expected: env.queue_depth(q) == n,
                             timeout=60, what=f"{queue} dead letters")

    for queue, expected in (("journal", bad), ("trials", bad),
                            ("comparison", [d for d in bad if d["event_type"] == "ml.run.stop"])):
        letters = await env.dead_letters(f"sntrack.{queue}")
        assert sorted(json.loads(m.body)["event_id"] for m in letters) == sorted(d["event_id"] for d in expected)
        assert {m.headers[REASON_HEADER] for m in letters} == {"invalid_event"}, queue
    assert await env.fetchval("SELECT count(*) FROM events") == len(good)

    for projection, tables in (("comparison", ("sn_comparison",)), ("trials", ("trials", "trial_metrics"))):
        live = await env.snapshot(*tables)
        await env.replay(projection)
        assert await env.snapshot(*tables) == live, projection
