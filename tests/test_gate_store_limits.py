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
        changed(start, ["payload", "hyperparams", "epochs"], 3e9),
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
    async with running_consumers(env.settings.consumer(), CONSUMERS):
        half = len(good) // 2
        await env.publish_events(good[:half])
        for doc in bad:
            await env.publish_raw([json.dumps(doc).encode()], routing_key=doc["event_type"])
        await env.publish_events(good[half:])
        for projection, expected in (("journal", len(good)), ("trials", len(good)), ("comparison", stops)):
            await wait_until(lambda p=projection, n=expected: env.has_applied(p, n), what=f"{projection}")
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


MAX_FLOAT = 1.7976931348623157e308


def at_the_limits(good) -> list:
    """A trial whose every value is as extreme as the contract allows: the store must hold each one."""
    start, metric, stop = (json.loads(next(e for e in good if e.event_type == t).to_json())
                           for t in ("ml.run.start", "ml.run.metric", "ml.run.stop"))
    trial = {"trial_id": "extreme-\U0001f642-" + "x" * 180, "model_run_id": "search-\u00e9"}
    producer = {**start["producer"], "pid": 2**31 - 1, "host": "h\U0001f642" * 1000}
    start = {**start, **trial, "event_id": str(uuid.uuid4()), "occurred_at": "0001-01-01T00:00:00Z",
             "producer": producer}
    start["payload"] = {**start["payload"], "seed": -(2**63), "optuna_trial_number": -(2**31),
                        "hyperparams": {"big": 10**300, "small": -(2**63), "tiny": 5e-324, "huge": MAX_FLOAT,
                                        "neg_zero": -0.0, "epochs": 2**31 - 1, "\U0001f642": "\u00e9\U0001f642"}}
    metric = {**metric, **trial, "event_id": str(uuid.uuid4()), "seq": 2**31 - 2, "producer": producer,
              "payload": {"epoch": 2**31 - 1, "measurements": {"val_loss": MAX_FLOAT,
                                                               "train_loss": -MAX_FLOAT,
                                                               "val_accuracy": 5e-324}}}
    stop = {**stop, **trial, "event_id": str(uuid.uuid4()), "seq": 2**31 - 1, "producer": producer,
            "occurred_at": "9999-12-31T23:59:59.999999Z"}
    stop["payload"] = {"status": "failed", "spectral_norm": True, "error": {"type": "exception", "message": "e" * 4000},
                       "measurements": {"duration_ms": MAX_FLOAT, "final_val_accuracy": -5e-324,
                                        "final_train_accuracy": 1.7976931348623157e308}}
    return [start, metric, stop]


async def test_the_most_extreme_valid_values_are_stored_by_every_consumer(env):
    # The other side of the contract: what it accepts, every projection stores, and a replay reproduces.
    extreme = at_the_limits([e for trial in synthetic_study(1, 2, producer=producer_info(), seed=3) for e in trial])
    async with running_consumers(env.settings.consumer(), CONSUMERS):
        for doc in extreme:
            await env.publish_raw([json.dumps(doc).encode()], routing_key=doc["event_type"])
        for projection, expected in (("journal", 3), ("trials", 3), ("comparison", 1)):
            await wait_until(lambda p=projection, n=expected: env.has_applied(p, n), what=projection)
    assert [env.queue_depth(f"sntrack.{name}.dlq") for name in CONSUMERS] == [0, 0, 0]
    row = (await env.fetch("SELECT seed, epochs, hyperparams, last_seq, started_at, finished_at FROM trials"))[0]
    assert (row["seed"], row["epochs"], row["last_seq"]) == (-(2**63), 2**31 - 1, 2**31 - 1)
    stored, sent = json.loads(row["hyperparams"]), extreme[0]["payload"]["hyperparams"]
    # jsonb keeps numbers as numeric, exactly as written: a float written without a fraction (1.79e308) reads
    # back as the integer it spells, which converts back to the same float.
    assert stored.keys() == sent.keys()
    assert all((float(stored[k]) if isinstance(v, float) else stored[k]) == v for k, v in sent.items()), stored
    assert (row["started_at"].year, row["finished_at"].year) == (1, 9999)
    for projection, tables in (("comparison", ("sn_comparison",)), ("trials", ("trials", "trial_metrics"))):
        live = await env.snapshot(*tables)
        await env.replay(projection)
        assert await env.snapshot(*tables) == live, projection
