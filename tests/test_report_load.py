"""How the report loads: the trials as columns (a TrialTable) give the report the records give, and what helper
connections read (hyper-parameters and σ, the curves) comes from the loading connection's snapshot, whatever commits
meanwhile."""

from __future__ import annotations

import asyncio
import gc
import random
import uuid
from datetime import UTC, datetime
from importlib.resources import files

import pytest

from consumers.persistence import apply_events
from consumers.registry import PROJECTIONS
from consumers.report.columns import Columns
from consumers.report.report import build_report
from consumers.report.snapshot import ComparisonData, JsonColumn, TrialTable, load, paused_gc
from producer.emitter import producer_info
from producer.sample import synthetic_study

NOW = datetime(2026, 11, 26, tzinfo=UTC)
# A new last epoch for every completed trial (its σ far from 1) and a new completed trial: committed after the
# snapshot, it changes every curve figure the report reads, if it is seen.
LATE_WRITES = """
INSERT INTO trial_metrics (trial_id, epoch, seq, val_accuracy, measurements, spectral_norms, occurred_at)
SELECT id, 99, 999, 0.5, '{}'::jsonb, '{"layers.0": 7.0}'::jsonb, now() FROM trials WHERE status = 'completed';
INSERT INTO trials (id, model_run_id, spectral_norm, status, metrics, inserted_at, updated_at)
VALUES ('late', 'loaded', true, 'completed', '{"final_val_accuracy": 0.5}', now(), now());
"""


class _LateWriter:
    """Commits LATE_WRITES once, on the first call, whichever helper calls first; the others wait for it."""

    def __init__(self, conn):
        self.conn, self.lock, self.written = conn, asyncio.Lock(), False

    async def __call__(self) -> None:
        async with self.lock:
            if not self.written:
                await self.conn.execute(LATE_WRITES)
                self.written = True


class _WritesBeforeItsFirstRead:
    """A helper connection that, before each read, has another connection commit LATE_WRITES (once)."""

    def __init__(self, conn, writer: _LateWriter):
        self.conn, self.writer = conn, writer

    def transaction(self, **options):
        return self.conn.transaction(**options)

    async def execute(self, sql: str):
        return await self.conn.execute(sql)

    async def fetch(self, sql: str, *args):
        await self.writer()
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args):
        await self.writer()
        return await self.conn.fetchrow(sql, *args)


def _seen(data: ComparisonData) -> tuple:
    return ([(t.id, t.epochs_to_95, t.sigmas) for t in data.trials], data.curves)


@pytest.mark.parametrize("helpers", [1, 2])
async def test_side_readers_read_the_snapshot_of_the_loading_connection(env, helpers):
    """With one helper, it reads hyper-parameters and σ and the loading connection reads the curves after the trials;
    with two, each reads one. Another connection commits LATE_WRITES before any helper reads."""
    study = synthetic_study(12, 4, seed=3, producer=producer_info(), model_run_id="loaded", paired=True)
    conn, writer, *others = [await env.db() for _ in range(2 + helpers)]
    try:
        await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
        before = await load(conn, "loaded")
        late = _LateWriter(writer)
        sides = [_WritesBeforeItsFirstRead(each, late) for each in others]
        during = await load(conn, "loaded", helpers=sides)
        after = await load(conn, "loaded", helpers=others)
    finally:
        for each in (conn, writer, *others):
            await each.close()
    assert late.written
    assert _seen(during) == _seen(before)
    assert _seen(after) != _seen(before) and len(after.trials) == len(before.trials) + 1


async def test_the_loaded_columns_give_the_report_the_records_give(env):
    study = synthetic_study(30, 5, seed=8, producer=producer_info(), model_run_id="loaded", paired=True)
    conn = await env.db()
    try:
        for name in ("trials", "comparison"):
            await apply_events(conn, PROJECTIONS[name], [e for trial in study for e in trial])
        data = await load(conn, "loaded")
    finally:
        await conn.close()
    assert isinstance(data.trials, TrialTable)
    records = list(data.trials)
    assert Columns(data.trials).ids == [t.id for t in records] == sorted(t.id for t in records)
    assert any(t.sigmas for t in records) and any(t.epochs_to_95 for t in records)
    as_records = ComparisonData(records, data.aggregates, data.curves, data.model_run_id, data.dataset,
                                data.journal_trials)
    assert build_report(data, now=NOW) == build_report(as_records, now=NOW)


@pytest.mark.parametrize("enabled", [True, False])
def test_paused_gc_gives_back_the_collector_as_it_found_it(enabled):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        with pytest.raises(RuntimeError), paused_gc():
            assert not gc.isenabled()
            raise RuntimeError
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


# What the report read from the curves before the trials projection kept their summaries: the oracle.
CURVE_SUMMARIES = """
SELECT t.id,
       (min(m.epoch) FILTER (WHERE m.val_accuracy >= 0.95 * (t.metrics->>'final_val_accuracy')::float8))::bigint + 1
           AS epochs_to_95,
       (array_agg(m.spectral_norms ORDER BY m.epoch DESC))[1] AS last_sigmas
FROM trials t JOIN trial_metrics m ON m.trial_id = t.id WHERE t.finished_at IS NOT NULL GROUP BY t.id ORDER BY t.id
"""
KEPT_SUMMARIES = """
SELECT id, epochs_to_95, last_sigmas FROM trials t
WHERE finished_at IS NOT NULL AND EXISTS (SELECT 1 FROM trial_metrics m WHERE m.trial_id = t.id) ORDER BY id
"""


async def _summaries(conn) -> tuple[list, list]:
    return ([tuple(r) for r in await conn.fetch(CURVE_SUMMARIES)], [tuple(r) for r in await conn.fetch(KEPT_SUMMARIES)])


async def test_stopped_trials_keep_the_summary_of_their_curve_whatever_the_order(env):
    """Metrics before and after their trial's stop, in one batch and across batches, a late metric that replaces
    the last epoch, and the same metric again: each stopped trial's epochs_to_95 and last σ are those of its curve
    as it stands, and a running trial has none."""
    study = synthetic_study(16, 6, seed=21, producer=producer_info(), model_run_id="kept")
    running_id = study[0][0].trial_id  # its stop never comes
    events = [e for trial in study for e in trial if not (e.trial_id == running_id and e.event_type == "ml.run.stop")]
    random.Random(5).shuffle(events)
    trials = PROJECTIONS["trials"]
    conn = await env.db()
    try:
        for batch in (events[:25], events[25:26], events[26:]):
            async with conn.transaction():
                await apply_events(conn, trials, batch)
        oracle, kept = await _summaries(conn)
        assert len(kept) >= 10 and kept == oracle and sum(r[1] is not None for r in kept) >= 10

        # A second stop with a higher seq (the trial reported lost after all) and no final accuracy: no epochs to 95%.
        first = next(e for e in events if e.event_type == "ml.run.stop")
        payload = first.payload.model_copy(update={"status": "failed", "measurements": {}})
        lost = first.model_copy(update={"event_id": uuid.uuid4(), "seq": first.seq + 50, "payload": payload})
        async with conn.transaction():
            await apply_events(conn, trials, [lost])
        oracle, kept = await _summaries(conn)
        assert kept == oracle
        assert await conn.fetchval("SELECT epochs_to_95 FROM trials WHERE id = $1", first.trial_id) is None

        # A higher-seq metric for the last epoch of a stopped trial: far below its final accuracy, its σ far from 1.
        last = max((e for e in events if e.event_type == "ml.run.metric"), key=lambda e: (e.trial_id, e.payload.epoch))
        payload = last.payload.model_copy(update={"spectral_norms": {"layers.0": 7.0}})
        late = last.model_copy(update={"event_id": uuid.uuid4(), "seq": last.seq + 100, "payload": payload})
        for again in ([late], [late]):
            async with conn.transaction():
                await apply_events(conn, trials, again)
        oracle, kept = await _summaries(conn)
        assert kept == oracle
        assert await conn.fetchval("SELECT last_sigmas FROM trials WHERE id = $1", late.trial_id) == '{"layers.0": 7.0}'
        running = await conn.fetchrow("SELECT finished_at, epochs_to_95, last_sigmas, (SELECT count(*) FROM "
                                      "trial_metrics WHERE trial_id = id) AS epochs FROM trials WHERE id = $1",
                                      running_id)
        assert running["epochs"] > 0 and tuple(running)[:3] == (None, None, None)
    finally:
        await conn.close()


async def test_the_migration_fills_the_summaries_of_trials_recorded_before_it(env):
    study = synthetic_study(12, 5, seed=22, producer=producer_info(), model_run_id="older")
    migration = (files("consumers") / "sql" / "013_trial_summary.sql").read_text()
    conn = await env.db()
    try:
        await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
        await conn.execute("UPDATE trials SET epochs_to_95 = NULL, last_sigmas = NULL")  # as before 013
        await conn.execute(migration[migration.index("UPDATE trials"):])
        oracle, kept = await _summaries(conn)
    finally:
        await conn.close()
    assert len(kept) >= 8 and kept == oracle


def test_a_json_column_gives_one_value_without_parsing_the_others():
    column = JsonColumn(['{"lr": 0.1}', None, '{"lr": 0.1}', "[1, 2]"], repeats=True)
    assert [column.item(i) for i in range(4)] == [{"lr": 0.1}, None, {"lr": 0.1}, [1, 2]]
    assert "values" not in vars(column)  # nothing parsed as a whole yet
    assert list(column) == [{"lr": 0.1}, None, {"lr": 0.1}, [1, 2]]
    assert column.item(3) is column.values[3]  # once parsed, the parsed values


def test_two_reads_of_trials_that_disagree_stop_the_report():
    from consumers.report.snapshot import _trial_columns

    main = {"id": ["a", "b"], "spectral_norm": [True, False]}
    with pytest.raises(RuntimeError, match="disagree: 2 trials, 1 hyper-parameter sets"):
        _trial_columns(main, {"hyperparams": ["{}"], "sigmas": [None]})
    assert len(_trial_columns(main, {"hyperparams": ["{}", None], "sigmas": [None, None]})["hyperparams"]) == 2
