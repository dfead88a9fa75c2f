"""ml.run.metric schema_version 2, and everything still written at version 1.

Version 2 groups an epoch's measurements by data split and adds the optimiser step. Old producers still send
version 1 and old journals hold it: the gate and the journal reader upcast both to version 2, and the read model they
give is the one version 1 always gave (the same flat measurement names; no step).
"""

import asyncio
import copy
import json
import os
import random
import signal
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from consumers.service import running_consumers
from producer.emitter import TrialEvents, producer_info
from producer.sample import synthetic_trial
from schemas import GateRejection, parse_event, read_stored
from schemas.history import RunMetricV1
from schemas.upcasting import upcast
from tests.conftest import wait_until
from tests.test_contract import DELETE, INVALID, LIMIT, METRIC_V1, body, changed

INSERT_V1 = """
INSERT INTO events (event_id, event_type, trial_id, model_run_id, seq, schema_version, occurred_at, envelope)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
"""


def as_v1(event) -> dict:
    """The envelope a version 1 producer sent for `event`: a metric's measurements flat, nothing else changed."""
    doc = json.loads(event.to_json())
    if event.event_type == "ml.run.metric":
        payload = event.payload
        doc["schema_version"] = 1
        doc["payload"] = {"epoch": payload.epoch, "measurements": payload.flat_measurements(),
                          "spectral_norms": payload.spectral_norms}
    return doc


names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=20)
prefixed = st.builds(lambda split, name: f"{split}_{name}", st.sampled_from(["train", "val", "test", "trai", ""]),
                     st.text(max_size=5).filter(lambda s: "\x00" not in s))


@given(st.dictionaries(names | prefixed.filter(bool), st.floats(allow_nan=False, allow_infinity=False), max_size=8))
def test_upcasting_keeps_every_v1_measurement_under_its_name(measurements):
    doc = changed(METRIC_V1, ["payload", "measurements"], measurements)
    event = parse_event(body(doc), max_bytes=LIMIT)
    assert event.schema_version == 2 and event.payload.step is None
    assert event.payload.flat_measurements() == measurements
    assert set(event.payload.splits) <= {"train", "val", "test"}


METRIC_CASES = [c for c in INVALID if c[1]["event_type"] == "ml.run.metric"]


@pytest.mark.parametrize("name, doc, path, value", METRIC_CASES, ids=[c[0] for c in METRIC_CASES])
def test_the_gate_accepts_a_v1_metric_exactly_when_version_1_did(name, doc, path, value):  # noqa: ARG001
    """The frozen version 1 model is the oracle for what an old producer may still send."""
    # Each metric rule, version 2's included, applied to a version 1 envelope (missing levels created).
    doc = copy.deepcopy(METRIC_V1)
    target = doc
    for key in path[:-1]:
        target = target.setdefault(key, {})
    if value is DELETE:
        target.pop(path[-1], None)
    else:
        target[path[-1]] = value
    candidate = body(doc)
    try:
        RunMetricV1.model_validate_json(candidate)
        accepted_then = True
    except ValidationError:
        accepted_then = False
    try:
        parse_event(candidate, max_bytes=LIMIT)
        accepted_now = True
    except GateRejection:
        accepted_now = False
    assert accepted_now == accepted_then


def test_the_journal_reader_upcasts_and_refuses_like_the_gate():
    event = read_stored(body(METRIC_V1))
    assert event == parse_event(body(METRIC_V1), max_bytes=LIMIT)
    assert event.payload.splits == {"train": {"loss": 0.5}, "val": {"accuracy": 0.9}}
    with pytest.raises(ValidationError):
        read_stored(body(changed(METRIC_V1, ["payload", "epoch"], -1)))
    assert upcast(json.loads(body(METRIC_V1)))["schema_version"] == 2


def test_producers_emit_version_2_with_split_measurements():
    event = TrialEvents("t", "s", producer_info("w"), next_seq=1).metric(
        3, {"train_loss": 0.2, "val_accuracy": 0.8, "lr": 0.1}, step=120)
    doc = json.loads(event.to_json())
    assert doc["schema_version"] == 2
    assert doc["payload"]["splits"] == {"train": {"loss": 0.2}, "val": {"accuracy": 0.8}}
    assert doc["payload"]["measurements"] == {"lr": 0.1} and doc["payload"]["step"] == 120


def _expected_curve(trials) -> dict:
    """(trial_id, epoch) → the trial_metrics columns version 1 always produced, plus the step."""
    out = {}
    for trial in trials:
        for e in trial:
            if e.event_type == "ml.run.metric":
                m = e.payload.flat_measurements()
                out[(e.trial_id, e.payload.epoch)] = (m.get("train_loss"), m.get("val_loss"), m.get("val_accuracy"),
                                                      m, e.payload.step)
    return out


async def test_a_v1_journal_plus_v2_live_events_project_correctly(env):
    rng, producer = random.Random(11), producer_info("w")
    old = [synthetic_trial(rng, "mixed", producer, epochs=4, number=n) for n in range(4)]  # journaled as version 1
    live = [synthetic_trial(rng, "mixed", producer, epochs=4, number=n) for n in range(4, 8)]
    # A version 2 producer that counts steps, and a version 1 producer still running beside it.
    stepped = [[e.model_copy(update={"payload": e.payload.model_copy(update={"step": 50 * (e.payload.epoch + 1)})})
                if e.event_type == "ml.run.metric" else e for e in trial] for trial in live[:2]]
    live = stepped + live[2:]
    old_producer = live[3]

    conn = await env.db()
    try:
        await conn.executemany(INSERT_V1, [
            (e.event_id, e.event_type, e.trial_id, e.model_run_id, e.seq, as_v1(e)["schema_version"], e.occurred_at,
             json.dumps(as_v1(e))) for trial in old for e in trial])
    finally:
        await conn.close()
    await env.replay("trials")  # the read model of the old journal, as an upgrade's rebuild makes it

    bodies = [json.dumps(as_v1(e)).encode() if trial is old_producer else e.to_json() for trial in live for e in trial]
    keys = [e.event_type for trial in live for e in trial]
    total = sum(map(len, old + live))
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        for raw, key in zip(bodies, keys, strict=True):
            await env.publish_raw([raw], routing_key=key)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", total), what="journal")
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'",
                                              total), what="trials")
    assert await env.dead_letters("sntrack.trials") == []

    expected = _expected_curve(old + live)
    rows = {(r["trial_id"], r["epoch"]): (r["train_loss"], r["val_loss"], r["val_accuracy"],
                                         json.loads(r["measurements"]), r["step"])
            for r in await env.fetch("SELECT * FROM trial_metrics")}
    assert rows == expected
    assert {r[4] for r in rows.values()} == {None, 50, 100, 150, 200}
    stops = {r["id"]: r["status"] for r in await env.fetch("SELECT id, status FROM trials")}
    assert stops == {t[-1].trial_id: t[-1].payload.status for t in old + live}

    # The old journal rows stay as they were written; what arrived live is journaled at version 2.
    versions = {r["event_id"]: r["schema_version"] for r in await env.fetch(
        "SELECT event_id, schema_version FROM events WHERE event_type = 'ml.run.metric'")}
    assert {versions[e.event_id] for t in old for e in t if e.event_type == "ml.run.metric"} == {1}
    assert {versions[e.event_id] for t in live for e in t if e.event_type == "ml.run.metric"} == {2}

    before = await env.snapshot("trials", "trial_metrics")
    await env.replay("trials")
    assert await env.snapshot("trials", "trial_metrics") == before


async def test_a_catch_up_subscriber_reads_a_v1_journal_as_version_2(env, tmp_path):
    """`sntrack subscribe --from-start` replays the journal through the same upcaster (consumers/catchup.py)."""
    trial = synthetic_trial(random.Random(5), "old", producer_info("w"), epochs=3)
    conn = await env.db()
    try:
        await conn.executemany(INSERT_V1, [
            (e.event_id, e.event_type, e.trial_id, e.model_run_id, e.seq, as_v1(e)["schema_version"], e.occurred_at,
             json.dumps(as_v1(e))) for e in trial])
    finally:
        await conn.close()
    metrics = [e for e in trial if e.event_type == "ml.run.metric"]
    out = tmp_path / "metrics.jsonl"
    async with running_consumers(env.settings.consumer(), ["journal"]):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sntrack", "subscribe", "v1reader", "--bind", "ml.run.metric", "--from-start",
            "--jsonl", str(out), env={**os.environ, **env.settings.to_env()}, stderr=asyncio.subprocess.PIPE)
        try:
            await wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= len(metrics),
                             what="the journal's metric events")
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr[-2000:]
    received = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["schema_version"] for r in received] == [2] * len(metrics)
    assert [r["payload"]["splits"] for r in received] == [json.loads(e.to_json())["payload"]["splits"] for e in metrics]
