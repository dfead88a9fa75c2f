"""Replay throughput of `trials` and `comparison` on a journal of at least 200k events, set-based (as shipped) beside
two same-run baselines: the same rebuild event by event through `project` (the reference path), and the COPY that
loaded the same rows into the journal (PostgreSQL's bulk-load rate on this machine).

A scratch database gets the journal by COPY (synthetic trials of up to 48 epochs: about 46 events a trial, a template
study copied with fresh ids). Each replay is `consumers.replay.replay`, as `sntrack replay NAME` runs it: shadow
tables, catch-up, swap; its time is the whole command's, swap included. The live projections are caught up (their
bookkeeping holds every journal event), as when a rebuild runs beside their consumers.
"""

from __future__ import annotations

import math
import os
import time

import asyncpg

from bench.rebuild_stall import JOURNAL_COLUMNS, journal_rows
from consumers.registry import PROJECTIONS
from consumers.replay import replay
from sntrack.settings import Settings
from tests.sandbox import sandbox

EPOCHS = 48
EVENTS_PER_TRIAL = 44  # at least, on average, for synthetic trials of 48 epochs (pruned and failed ones stop early)
TEMPLATE_TRIALS = 100
NAMES = ("trials", "comparison")


async def _copy(database_url: str, rows: list[tuple]) -> dict:
    """COPY the rows into the journal (timed), then record them as applied by the live projections, as their
    consumers would have: the swap then has no bookkeeping of its own to add, as in a rebuild beside them."""
    conn = await asyncpg.connect(database_url)
    try:
        started = time.perf_counter()
        await conn.copy_records_to_table("events", records=rows, columns=JOURNAL_COLUMNS)
        seconds = time.perf_counter() - started
        await conn.execute("INSERT INTO applied_events (projection, event_id) SELECT p, event_id FROM events "
                           "CROSS JOIN unnest($1::text[]) p", list(NAMES))
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return {"rows": len(rows), "seconds": round(seconds, 2), "rows_per_s": round(len(rows) / seconds)}


async def _replay(database_url: str, name: str, *, set_based: bool) -> dict:
    pool = await asyncpg.create_pool(database_url, min_size=2, max_size=2)
    try:
        result = await replay(pool, PROJECTIONS[name], set_based=set_based)
    finally:
        await pool.close()
    assert result.set_based == set_based, f"{name}: the set-based path was not taken"
    return {"events": result.events, "seconds": round(result.seconds, 2), "events_per_s": round(result.events_per_s),
            "swap_ms": round(result.swap_seconds * 1000)}


async def run(base: Settings, events: int = 200_000) -> dict:
    rows = list(journal_rows(math.ceil(events / EVENTS_PER_TRIAL), seed=3, epochs=EPOCHS,
                             template_trials=TEMPLATE_TRIALS))
    assert len(rows) >= events, f"{len(rows)} journal rows, fewer than {events}"
    load = [round(os.getloadavg()[0], 2)]
    async with sandbox(base, prefix="sntrack-bench-replay") as settings:
        copy = await _copy(settings.database_url, rows)
        projections = {}
        for name in NAMES:
            projections[name] = {"set_based": await _replay(settings.database_url, name, set_based=True),
                                 "project": await _replay(settings.database_url, name, set_based=False)}
            projections[name]["speedup"] = round(projections[name]["set_based"]["events_per_s"]
                                                 / projections[name]["project"]["events_per_s"], 1)
            load.append(round(os.getloadavg()[0], 2))
    return {"journal_events": len(rows), "copy": copy, "projections": projections, "target_events_per_s": 50_000,
            "cpus": os.cpu_count(), "load_avg_1m": load}
