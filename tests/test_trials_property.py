"""Exactly-once, order-free: any permutation and duplication of a trial's events yields the same rows."""

import asyncio
import random

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.persistence import Store
from consumers.projections.trials import TrialsProjection
from producer.emitter import producer_info
from producer.sample import synthetic_trial

PROJECTION = TrialsProjection()
TRIAL = synthetic_trial(random.Random(3), "study-p", producer_info("w"), epochs=6)
# A failed or pruned trial has fewer metric events; make sure the property covers a complete one as well.
assert TRIAL[-1].event_type == "ml.run.stop"


async def _rows_after(database_url: str, deliveries: list[list]) -> tuple:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("TRUNCATE trials, trial_metrics, applied_events")
        store = Store(pool)
        for batch in deliveries:
            await store.apply(PROJECTION, batch)
        async with pool.acquire() as conn:
            trial = await conn.fetch("SELECT * FROM trials")
            curve = await conn.fetch("SELECT * FROM trial_metrics ORDER BY epoch")
            applied = await conn.fetchval("SELECT count(*) FROM applied_events")
        return [dict(r) for r in trial], [dict(r) for r in curve], applied
    finally:
        await pool.close()


@st.composite
def deliveries(draw):
    indices = list(range(len(TRIAL)))
    duplicated = draw(st.lists(st.sampled_from(indices), max_size=len(TRIAL)))
    order = draw(st.permutations(indices + duplicated))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=4)))
    bounds = [0, *cuts, len(order)]
    return [[TRIAL[i] for i in order[a:b]] for a, b in zip(bounds, bounds[1:], strict=False) if a < b]


def test_any_order_and_duplication_gives_the_same_rows(env):
    url = env.settings.database_url
    expected = asyncio.run(_rows_after(url, [TRIAL]))
    assert expected[0][0]["status"] == TRIAL[-1].payload.status
    assert len(expected[1]) == sum(e.event_type == "ml.run.metric" for e in TRIAL)
    assert expected[2] == len(TRIAL)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(deliveries())
    def check(batches):
        assert asyncio.run(_rows_after(url, batches)) == expected

    check()
