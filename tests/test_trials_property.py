"""Exactly-once, order-free: any permutation and duplication of a trial's events yields the same rows."""

import asyncio
import random

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.persistence import Store
from consumers.projections.trials import TrialsProjection
from producer.emitter import TrialEvents, producer_info
from producer.sample import synthetic_trial
from schemas import RunError

PROJECTION = TrialsProjection()
EPOCHS = 6
_RUN = synthetic_trial(random.Random(1), "study-p", producer_info("w"), epochs=EPOCHS)
assert _RUN[-1].payload.status == "completed"  # a complete curve, not a pruned or failed one
# A second stop: the worker made its stop durable and died before telling Optuna, so another worker reports the
# trial lost with seq epochs + 2 (producer.study.lost_trial_stop). The stop with the higher seq must win in any order.
LOST = TrialEvents(_RUN[0].trial_id, "study-p", producer_info("w2"), next_seq=EPOCHS + 2).stop(
    "failed", _RUN[0].payload.spectral_norm, {}, RunError(type="worker_lost", message="heartbeat stopped"))
TRIAL = [*_RUN, LOST]


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
    assert expected[0][0]["status"] == "failed" and expected[0][0]["error_type"] == "worker_lost"
    assert len(expected[1]) == sum(e.event_type == "ml.run.metric" for e in TRIAL)
    assert expected[2] == len(TRIAL)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(deliveries())
    def check(batches):
        assert asyncio.run(_rows_after(url, batches)) == expected

    check()
