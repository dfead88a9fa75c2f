"""Comparison query at 100k trials: sn_comparison (a few rows by primary key) beside the equivalent GROUP BY over
`trials`, timed in the same run on the same scratch database (target: ≤ 5 ms p95 for sn_comparison).

The scratch database is filled directly (COPY into `trials`, then sn_comparison derived from it with one SQL
statement, the same one the tests use to check the projection): this measures the query, not the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.timing import percentiles
from common.postgres import create_database, drop_database
from common.urls import with_path
from consumers.persistence import migrate
from consumers.projections.sn_comparison import OVERALL
from consumers.report.queries import (
    AVG_VAL_ACCURACY_BY_FLAG,
    AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS,
    COMPARISON_COLUMNS,
    COMPARISON_FROM_TRIALS,
)

TARGET_P95_MS = 5.0
TRIALS_PER_SEARCH = 1000
STATUSES = ("completed",) * 85 + ("pruned",) * 10 + ("failed",) * 5
COLUMNS = ("id", "model_run_id", "spectral_norm", "status", "metrics", "dataset", "duration_ms", "last_seq",
           "inserted_at", "updated_at")


def _rows(trials: int, seed: int = 0):
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(days=30)
    for i in range(trials):
        flag = rng.random() < 0.5
        val = min(0.999, rng.gauss(0.95 if flag else 0.945, 0.01))
        metrics = {"final_val_accuracy": val, "final_train_accuracy": min(1.0, val + rng.uniform(0, 0.03)),
                   "duration_ms": rng.uniform(500, 3000)}
        at = start + timedelta(seconds=20 * i)
        yield (f"bench-{i:07d}", f"search-{i // TRIALS_PER_SEARCH:04d}", flag, rng.choice(STATUSES),
               json.dumps(metrics), "digits", metrics["duration_ms"], 10, at, at)


async def _time(statement, args: tuple) -> float:
    started = time.perf_counter()
    await statement.fetch(*args)
    return (time.perf_counter() - started) * 1000


async def run(database_url: str, trials: int = 100_000, budget_s: float = 20.0) -> dict:
    scratch = f"sntrack_bench_comparison_{uuid.uuid4().hex[:8]}"
    scratch_url = with_path(database_url, scratch)
    await asyncio.to_thread(create_database, scratch_url)
    try:
        conn = await asyncpg.connect(scratch_url)
        try:
            await migrate(conn)
            filled = time.perf_counter()
            await conn.copy_records_to_table("trials", records=_rows(trials), columns=COLUMNS)
            await conn.execute(f"INSERT INTO sn_comparison ({', '.join(COMPARISON_COLUMNS)}) "
                               f"SELECT {', '.join(COMPARISON_COLUMNS)} FROM ({COMPARISON_FROM_TRIALS}) AS derived")
            await conn.execute("ANALYZE trials; ANALYZE sn_comparison")
            fill_s = time.perf_counter() - filled
            aggregate = await conn.prepare(AVG_VAL_ACCURACY_BY_FLAG)
            group_by = await conn.prepare(AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS)
            rows = await conn.fetchval("SELECT count(*) FROM sn_comparison")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {AVG_VAL_ACCURACY_BY_FLAG}", OVERALL))
            fast, slow = [], []
            deadline = time.monotonic() + budget_s
            # Interleaved, so both see the same machine noise; the GROUP BY is sampled every 10th round.
            for round_ in range(2000):
                fast.append(await _time(aggregate, (OVERALL,)))
                if round_ % 10 == 0:
                    slow.append(await _time(group_by, ()))
                if time.monotonic() > deadline and len(slow) >= 5:
                    break
            same = [(r[0], r[1]) for r in await aggregate.fetch(OVERALL)] == [
                (r[0], r[1]) for r in await group_by.fetch()]
        finally:
            await conn.close()
    finally:
        await asyncio.to_thread(drop_database, scratch_url)
    fast_ms, slow_ms = percentiles(fast), percentiles(slow)
    return {
        "trials": trials, "sn_comparison_rows": rows, "fill_s": round(fill_s, 2),
        "sn_comparison_ms": fast_ms, "group_by_trials_ms": slow_ms, "same_counts": same,
        "speedup_p50": slow_ms["p50"] / fast_ms["p50"], "target_p95_ms": TARGET_P95_MS,
        "target_met": fast_ms["p95"] <= TARGET_P95_MS, "plan": plan,
    }


if __name__ == "__main__":
    from sntrack.settings import Settings

    print(json.dumps(asyncio.run(run(Settings.from_env().database_url)), indent=2))
