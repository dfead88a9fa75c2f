"""The contract every registered projection keeps (DESIGN invariants 2 and 3), in the spirit of eventsourcing's
recorder test cases: one test, run for each entry of consumers.registry.PROJECTIONS, so a new projection is held to
it without writing anything.

For a study mixing completed, pruned and failed trials, paired and unpaired, and one trial with two stops, any
permutation, duplication and split into batches ends in the same rows as in-order application, and those equal a
fresh replay from the journal (set-based where the projection has `bulk` SQL). On hostile journals the set-based
replay equals the replay through `project`, value by value.
"""

import asyncio
import copy
import json
import random
import uuid
from collections import Counter

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumers.persistence import Store, apply_events
from consumers.projections.base import Projection, Statement
from consumers.projections.trials import TrialsProjection
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from producer.emitter import TrialEvents, producer_info
from producer.sample import synthetic_study
from schemas import SCHEMA_VERSIONS, RunError, parse_event
from schemas.history import RunMetricV1
from tests.test_contract import LIMIT, METRIC, METRIC_V1, START, STOP

EPOCHS = 3
PAIRED = synthetic_study(6, EPOCHS, seed=8, producer=producer_info("w"), model_run_id="paired", paired=True)
UNPAIRED = synthetic_study(6, EPOCHS, seed=108, producer=producer_info("w"), model_run_id="unpaired")
# A second stop: the worker made its completed stop durable and died before telling Optuna, so another worker reports
# the trial lost with seq epochs + 2 (producer.study.lost_trial_stop). The stop with the higher seq must win in any
# order.
_SURVIVOR = UNPAIRED[0]
LOST = TrialEvents(_SURVIVOR[0].trial_id, "unpaired", producer_info("w2"), next_seq=EPOCHS + 2).stop(
    "failed", _SURVIVOR[0].payload.spectral_norm, {}, RunError(type="worker_lost", message="heartbeat stopped"))
EVENTS = [e for trial in PAIRED + UNPAIRED for e in trial] + [LOST]

# The journal's own table, and its columns that record arrival (position, recorded_at), not the events.
JOURNAL_TABLES = {"journal": ("events",)}
ARRIVAL_COLUMNS = {"position", "recorded_at"}


def test_the_study_covers_every_outcome_both_designs_and_a_second_stop():
    outcomes = Counter(trial[-1].payload.status for trial in PAIRED + UNPAIRED)
    assert set(outcomes) == {"completed", "pruned", "failed"}, outcomes
    assert _SURVIVOR[-1].payload.status == "completed" and _SURVIVOR[-1].seq == EPOCHS + 1 < LOST.seq
    assert all(t[0].payload.paired_with == PAIRED[i - 1][0].trial_id for i, t in enumerate(PAIRED) if i % 2)
    assert all(t[0].payload.paired_with is None for t in UNPAIRED)
    for study in (PAIRED, UNPAIRED):
        assert {t[-1].payload.status for t in study} > {"completed"}  # each design has an unfinished trial too


def _tables(projection: Projection) -> tuple[str, ...]:
    tables = projection.tables or JOURNAL_TABLES.get(projection.name, ())
    assert tables, f"projection {projection.name} names no tables to compare"
    return tables


async def _rows(conn: asyncpg.Connection, projection: Projection) -> dict[str, list[dict]]:
    """Every row of the projection's tables in primary-key order, plus the events it recorded as applied."""
    out = {}
    for table in _tables(projection):
        key = await conn.fetchval(
            "SELECT string_agg(a.attname, ', ' ORDER BY array_position(i.indkey, a.attnum)) "
            "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = $1::regclass AND i.indisprimary", table)
        if key == "position":  # the journal: order by what identifies an event, not by arrival
            key = "event_id"
        rows = await conn.fetch(f"SELECT * FROM {table} ORDER BY {key}")
        out[table] = [{k: v for k, v in r.items() if k not in ARRIVAL_COLUMNS} for r in rows]
    out["applied_events"] = sorted(await conn.fetchval(
        "SELECT array_agg(event_id) FROM applied_events WHERE projection = $1", projection.name) or [])
    return out


async def _apply(url: str, projection: Projection, deliveries: list[list]) -> dict[str, list[dict]]:
    """From empty tables, apply `deliveries` (batches, each one transaction as the live runtime does); the rows."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await _clear(conn, projection)
        store = Store(pool)
        for batch in deliveries:
            await store.apply(projection, batch)
        async with pool.acquire() as conn:
            return await _rows(conn, projection)
    finally:
        await pool.close()


async def _clear(conn: asyncpg.Connection, projection: Projection) -> None:
    if projection.name in JOURNAL_TABLES:  # append-only: emptied the one way it allows, a study at a time (006)
        for study in {e.model_run_id for e in EVENTS}:
            await conn.execute("SELECT set_config('sntrack.hard_delete', $1, true)", study)
            await conn.execute("DELETE FROM events WHERE model_run_id = $1", study)
    else:
        await conn.execute(f"TRUNCATE {', '.join(_tables(projection))}")
    await conn.execute("DELETE FROM applied_events WHERE projection = $1", projection.name)


@st.composite
def deliveries(draw):
    """EVENTS in a random order, some of them more than once, cut into random batches."""
    indices = list(range(len(EVENTS)))
    duplicated = draw(st.lists(st.sampled_from(indices), max_size=len(EVENTS) // 2))
    order = draw(st.permutations(indices + duplicated))
    cuts = sorted(draw(st.sets(st.integers(1, len(order) - 1), max_size=6)))
    bounds = [0, *cuts, len(order)]
    return [[EVENTS[i] for i in order[a:b]] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("name", sorted(PROJECTIONS))
def test_any_order_duplication_and_batching_gives_the_in_order_rows_and_the_replayed_ones(env, name):
    projection, url = PROJECTIONS[name], env.settings.database_url
    in_order = asyncio.run(_apply(url, projection, [EVENTS]))
    assert any(in_order[t] for t in _tables(projection)), "the study wrote no rows: the test would prove nothing"
    # One bookkeeping row per event, or none for a projection whose own writes dedupe (the journal's event_id).
    assert len(in_order["applied_events"]) == (0 if projection.dedupes_itself else len(EVENTS))

    if projection.replayable:
        async def journal_then_replay():
            conn = await env.db()
            try:
                await apply_events(conn, PROJECTIONS["journal"], EVENTS)
            finally:
                await conn.close()
            await env.replay(name)
            conn = await env.db()
            try:
                return await _rows(conn, projection)
            finally:
                await conn.close()
        assert asyncio.run(journal_then_replay()) == in_order

    _any_delivery_gives(url, projection, in_order)


def _any_delivery_gives(url: str, projection: Projection, expected: dict, **options) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], **options)
    @given(deliveries())
    def check(batches):
        assert asyncio.run(_apply(url, projection, batches)) == expected

    check()


class LastStopWins(TrialsProjection):
    """A broken fold: the stop applied last sets the status, whatever its seq."""

    def project(self, event):
        yield from super().project(event)
        if event.event_type == "ml.run.stop":
            yield Statement("UPDATE trials SET status = $2 WHERE id = $1", (event.trial_id, event.payload.status))


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # hypothesis prints the failing batches
def test_the_contract_catches_a_projection_that_depends_on_order(env):
    url = env.settings.database_url
    in_order = asyncio.run(_apply(url, LastStopWins(), [EVENTS]))
    with pytest.raises(AssertionError):
        _any_delivery_gives(url, LastStopWins(), in_order, phases=[Phase.generate])


async def test_the_higher_seq_stop_wins_in_the_trials_read_model(env):
    """What the contract test compares, checked once by value: the lost-worker stop overrides the completed one."""
    await _apply(env.settings.database_url, PROJECTIONS["trials"], [EVENTS])
    row = (await env.fetch("SELECT status, error_type FROM trials WHERE id = $1", LOST.trial_id))[0]
    assert (row["status"], row["error_type"]) == ("failed", "worker_lost")
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == sum(e.event_type == "ml.run.metric"
                                                                          for e in EVENTS)


# A journal the gate accepted, with what a set-based reading could get wrong: a trial started twice (the second start
# without an MLflow run id), a stop before its start, two stops of equal seq, a worker_lost stop that supersedes a
# completed one, metrics after the stops and twice for one epoch (higher seq, and equal seq), version 1 metrics as an
# old journal holds them, a split's value shadowing a same-named measurement, numbers at the edges of a float (1e300,
# 5e-324, -0.0, 1e16), integers at the edges of their columns, non-integer and boolean `epochs`, unicode, and gaps
# that are equal but print differently (0.9 - 0.4 and 0.95 - 0.45).
async def test_a_stop_sets_the_flag_over_its_start_in_any_order(env):
    """A stop repeats the flag (sn_comparison counts it by the stop's); one that differs from its start's wins in
    any order and batching, as the set-based replay reads it."""
    start, stop = (parse_event(json.dumps(doc).encode(), max_bytes=LIMIT)
                   for doc in (_doc(START, "flip", 0), _doc(STOP, "flip", 2, spectral_norm=False)))
    for batches in ([[start, stop]], [[stop, start]], [[stop], [start]], [[start], [stop]]):
        rows = await _apply(env.settings.database_url, PROJECTIONS["trials"], batches)
        assert [(r["spectral_norm"], r["status"]) for r in rows["trials"]] == [(False, "completed")], batches


def _doc(template: dict, trial: str, seq: int, at: str = "2026-11-25T10:00:00Z", run: str = "hostile",
         **payload) -> dict:
    doc = {**copy.deepcopy(template), "event_id": str(uuid.uuid4()), "trial_id": trial, "model_run_id": run,
           "seq": seq, "occurred_at": at}
    doc["payload"].update(payload)
    return doc


def _hostile() -> list[dict]:
    lost = {"status": "failed", "spectral_norm": False, "measurements": {},
            "error": {"type": "worker_lost", "message": "heartbeat stopped ⏱"}}
    odd = {"": "", "lr": 1e300, "tiny": 5e-324, "neg": -0.0, "big": 10**30, "epochs": 5.0, "name": "é🧪\u202e",
           "flag": True, "none": None}
    return [
        _doc(START, "twice", 0, hyperparams={"epochs": 3}, mlflow_run_id="run-1", dataset="wine"),
        _doc(START, "twice", 0, "2026-11-25T09:00:00+05:30", spectral_norm=False, hyperparams=odd, seed=-(2**63),
             optuna_trial_number=2**31 - 1, paired_with="ünï", model="ｍｌｐ"),
        _doc(STOP, "twice", 5, "2026-11-25T10:05:00Z"),
        _doc(STOP, "twice", 7, "2026-11-25T10:07:00Z", **lost),
        _doc(METRIC, "twice", 8, "2026-11-25T10:08:00Z", epoch=0, step=2**63 - 1, spectral_norms=None,
             measurements={"val_accuracy": 0.1, "lr": 1e-7, "train_loss": 2.0},
             splits={"val": {"accuracy": 0.9}, "test": {"loss": 1e16}, "train": {"loss": -0.0}}),
        _doc(METRIC, "twice", 3, epoch=0, splits={"train": {"loss": 9.0}}),
        _doc(METRIC, "twice", 4, epoch=1, splits={"val": {"loss": 1.0}}),
        _doc(METRIC, "twice", 4, epoch=1, splits={"val": {"loss": 2.0}}, spectral_norms={"a": 5e-324}),
        {**_doc(METRIC_V1, "twice", 9, epoch=2), "schema_version": 1, "payload": {
            "epoch": 2, "measurements": {"train_loss": 0.5, "trai_x": 1.0, "train_": 2.0, "val_accuracy": 0.75}}},
        _doc(STOP, "stops only", 3, "2026-11-25T11:00:00Z", status="pruned", spectral_norm=True,
             measurements={"final_val_accuracy": 0.4, "final_train_accuracy": 0.9, "duration_ms": 1e300}),
        _doc(STOP, "stops only", 3, "2026-11-25T11:01:00Z", status="pruned", spectral_norm=False,
             measurements={"final_val_accuracy": 0.45, "final_train_accuracy": 0.95, "duration_ms": 5e-324}),
        _doc(STOP, "same gap", 1, status="pruned", spectral_norm=True,
             measurements={"final_val_accuracy": 0.45, "final_train_accuracy": 0.95}),
        _doc(STOP, "same negative gap", 1, status="pruned", spectral_norm=True,
             measurements={"final_val_accuracy": 0.95, "final_train_accuracy": 0.45}),
        _doc(STOP, "stops only", 2, "2026-11-25T10:59:00Z", run="other", status="completed",
             measurements={"final_val_accuracy": 0.45, "final_train_accuracy": 0.95, "duration_ms": -0.0}),
        _doc(STOP, "stop first", 4, "0001-01-02T00:00:00Z", status="pruned",
             measurements={"final_val_accuracy": 0.9, "final_train_accuracy": 0.4}),
        _doc(START, "stop first", 0, "9999-12-30T00:00:00Z", hyperparams={"epochs": True}),
        _doc(START, "it's \"q\" ✓", 0, run="st'udy ✓", hyperparams={"epochs": -(2**31)}),
        _doc(METRIC, "it's \"q\" ✓", 1, run="st'udy ✓", epoch=2**31 - 1, measurements={"x": 1e-300}),
    ]


INSERT_STORED = """
INSERT INTO events (event_id, event_type, trial_id, model_run_id, seq, schema_version, occurred_at, envelope)
SELECT event_id, event_type, trial_id, model_run_id, seq, schema_version, occurred_at, envelope::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::timestamptz[], $8::text[])
    AS s(event_id, event_type, trial_id, model_run_id, seq, schema_version, occurred_at, envelope)
"""


def _stored(doc: dict):
    """The journal's row for an accepted envelope, as the journal consumer writes it (model_dump_json of the
    validated event); a version 1 metric as the journal held it before version 2."""
    if doc["schema_version"] == 1 and doc["event_type"] == "ml.run.metric":
        event = RunMetricV1.model_validate_json(json.dumps(doc))
    else:
        event = parse_event(json.dumps(doc).encode(), max_bytes=LIMIT)
    return (event.event_id, event.event_type, event.trial_id, event.model_run_id, event.seq, event.schema_version,
            event.occurred_at, event.model_dump_json())


def _exact(rows: dict) -> dict:
    """Rows with every value as its type and text: 0.5 and 0.50 (Decimal) and -0.0 and 0.0 (float) differ here."""
    return {t: [{k: (type(v).__name__, str(v)) for k, v in r.items()} for r in rs] if t != "applied_events" else rs
            for t, rs in rows.items()}


@pytest.mark.parametrize("name", sorted(n for n, p in PROJECTIONS.items() if p.bulk))
def test_the_set_based_sql_reads_every_version_up_to_the_current_one(name):
    """A new event version that the SQL does not read yet would send every replay through `project`: correct,
    slow, and silent. This fails first."""
    for event_type, versions in PROJECTIONS[name].bulk_versions.items():
        assert versions == frozenset(range(1, SCHEMA_VERSIONS[event_type] + 1)), event_type


async def _replay_rows(env, conn: asyncpg.Connection, projection: Projection, *, set_based: bool) -> tuple:
    pool = await asyncpg.create_pool(env.settings.database_url, min_size=2, max_size=2)
    try:
        result = await replay(pool, projection, set_based=set_based)
    finally:
        await pool.close()
    return result, _exact(await _rows(conn, projection))


@pytest.mark.parametrize("name", sorted(n for n, p in PROJECTIONS.items() if p.bulk))
async def test_set_based_replay_equals_the_python_fold_on_hostile_journals(env, name):
    projection, docs = PROJECTIONS[name], _hostile() + [json.loads(e.to_json()) for e in EVENTS]
    stored = [_stored(doc) for doc in docs]
    conn = await env.db()
    try:
        for order in range(4):  # the journal's position order decides ties; four orders, the first as written
            if order:
                random.Random(order).shuffle(stored)
            async with conn.transaction():
                for study in {row[3] for row in stored}:
                    await conn.execute("SELECT set_config('sntrack.hard_delete', $1, true)", study)
                    await conn.execute("DELETE FROM events WHERE model_run_id = $1", study)
                await conn.execute(INSERT_STORED, *map(list, zip(*stored, strict=True)))
            fast, rows = await _replay_rows(env, conn, projection, set_based=True)
            slow, reference = await _replay_rows(env, conn, projection, set_based=False)
            assert (fast.set_based, slow.set_based, fast.events, slow.events) == (True, False, len(docs), len(docs))
            assert rows == reference, f"order {order}"
        assert all(rows[t] for t in projection.tables)

        # What the SQL does not read goes through `project`: an event version it does not list, a deleted study's
        # events (which the journal never keeps: studies.hard_delete removes them).
        narrower = copy.copy(projection)
        narrower.bulk_versions = {**projection.bulk_versions, "ml.run.stop": frozenset()}
        assert not (await _replay_rows(env, conn, narrower, set_based=True))[0].set_based
        await conn.execute("INSERT INTO deleted_studies (model_run_id) VALUES ('other')")
        # as studies.hard_delete does with the bookkeeping (it also empties the journal of the study, which this
        # test keeps to see `project` skip its events)
        await conn.execute("DELETE FROM applied_events a USING events e WHERE e.event_id = a.event_id "
                           "AND e.model_run_id = 'other'")
        fallback, rows = await _replay_rows(env, conn, projection, set_based=True)
        assert not fallback.set_based and rows != reference
    finally:
        await conn.close()
