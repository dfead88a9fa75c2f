"""How the report loads: the trials as columns (a TrialTable) give the report the records give, and the curves read
on helper connections come from the loading connection's snapshot, whatever commits meanwhile."""

from __future__ import annotations

import gc
from datetime import UTC, datetime

import pytest

from consumers.persistence import apply_events
from consumers.registry import PROJECTIONS
from consumers.report.columns import Columns, TrialTable, paused_gc
from consumers.report.report import ComparisonData, build_report, load
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


class _WritesBeforeItsFirstRead:
    """A helper connection that, before its first read, has another connection commit LATE_WRITES."""

    def __init__(self, conn, writer):
        self.conn, self.writer, self.written = conn, writer, False

    def transaction(self, **options):
        return self.conn.transaction(**options)

    async def execute(self, sql: str):
        return await self.conn.execute(sql)

    async def fetch(self, sql: str, *args):
        if not self.written:
            await self.writer.execute(LATE_WRITES)
            self.written = True
        return await self.conn.fetch(sql, *args)


def _seen(data: ComparisonData) -> tuple:
    return ([(t.id, t.epochs_to_95, t.sigmas) for t in data.trials], data.curves)


async def test_side_readers_read_the_snapshot_of_the_loading_connection(env):
    study = synthetic_study(12, 4, seed=3, producer=producer_info(), model_run_id="loaded", paired=True)
    conn, writer, *helpers = [await env.db() for _ in range(5)]
    try:
        await apply_events(conn, PROJECTIONS["trials"], [e for trial in study for e in trial])
        before = await load(conn, "loaded")
        side = [_WritesBeforeItsFirstRead(helpers[0], writer), *helpers[1:]]
        during = await load(conn, "loaded", helpers=side)
        after = await load(conn, "loaded", helpers=helpers)
    finally:
        for each in (conn, writer, *helpers):
            await each.close()
    assert side[0].written
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
