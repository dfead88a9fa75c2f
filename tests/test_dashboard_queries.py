"""The dashboard queries documented in docs/queries.md return what their names promise, on the real read model."""

from datetime import UTC, datetime, timedelta

import pytest

from consumers.persistence import apply_events
from consumers.projections.sn_comparison import OVERALL
from consumers.registry import PROJECTIONS
from consumers.report.queries import (
    AVG_VAL_ACCURACY_BY_FLAG,
    AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS,
    RECENT_TRIALS,
    TRIALS_BY_FLAG_AND_STATUS,
)
from producer.emitter import producer_info
from producer.sample import synthetic_study


def _study(trials: int, seed: int, run: str, age: timedelta) -> list[list]:
    """A study whose trials started `age` ago, one minute apart (the newest is the last)."""
    study = synthetic_study(trials, 2, seed=seed, producer=producer_info("w"), model_run_id=run)
    start = datetime.now(UTC) - age
    return [[e.model_copy(update={"occurred_at": start + timedelta(minutes=n, seconds=i)}) for i, e in enumerate(t)]
            for n, t in enumerate(study)]


async def test_recent_trials_by_flag_and_status_and_the_average_by_flag(env):
    recent = _study(25, 0, "recent", timedelta(hours=2))
    old = _study(5, 5, "old", timedelta(days=3))
    conn = await env.db()
    try:
        for name in ("trials", "comparison"):
            await apply_events(conn, PROJECTIONS[name], [e for t in recent + old for e in t])

        rows = await conn.fetch(RECENT_TRIALS)
        assert [r["id"] for r in rows] == [t[0].trial_id for t in reversed(recent)][:20]  # last day, newest first
        assert rows[0]["final_val_accuracy"] == pytest.approx(recent[-1][-1].payload.measurements["final_val_accuracy"])

        everything = recent + old
        assert {t[-1].payload.status for t in everything} == {"completed", "pruned", "failed"}
        for flag in (True, False):
            for status in ("completed", "pruned", "failed"):
                wanted = sorted((t for t in everything if (t[0].payload.spectral_norm, t[-1].payload.status) == (
                    flag, status)), key=lambda t: t[0].occurred_at, reverse=True)
                rows = await conn.fetch(TRIALS_BY_FLAG_AND_STATUS, flag, status, 3)
                assert [r["id"] for r in rows] == [t[0].trial_id for t in wanted[:3]]
                assert all((r["spectral_norm"], r["status"]) == (flag, status) for r in rows)

        by_flag = [tuple(r) for r in await conn.fetch(AVG_VAL_ACCURACY_BY_FLAG, OVERALL)]
        completed = {flag: [t[-1].payload.measurements["final_val_accuracy"] for t in everything
                            if t[0].payload.spectral_norm is flag and t[-1].payload.status == "completed"]
                     for flag in (False, True)}
        assert [(f, n) for f, n, _ in by_flag] == [(f, len(v)) for f, v in completed.items()]
        for (flag, _, mean), (_, n_trials, mean_from_trials) in zip(
                by_flag, await conn.fetch(AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS), strict=True):
            assert mean == pytest.approx(sum(completed[flag]) / len(completed[flag]))
            assert mean_from_trials == pytest.approx(mean) and n_trials == len(completed[flag])
    finally:
        await conn.close()
