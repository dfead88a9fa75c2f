"""The contract every registered projection keeps (DESIGN invariants 2 and 3), in the spirit of eventsourcing's
recorder test cases: one test, run for each entry of consumers.registry.PROJECTIONS, so a new projection is held to
it without writing anything.

For a study mixing completed, pruned and failed trials, paired and unpaired, and one trial with two stops, any
permutation, duplication and split into batches ends in the same rows as in-order application, and those equal a
fresh replay from the journal.
"""

import asyncio
from collections import Counter

import asyncpg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumers.persistence import Store, apply_events
from consumers.projections.base import Projection, Statement
from consumers.projections.trials import TrialsProjection
from consumers.registry import PROJECTIONS
from producer.emitter import TrialEvents, producer_info
from producer.sample import synthetic_study
from schemas import RunError

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
    assert len(in_order["applied_events"]) == len(EVENTS)

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
