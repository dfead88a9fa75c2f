"""Pruning the bookkeeping of idempotently applied events (consumers/pruning.py), on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from consumers import pruning
from consumers.lag import lags
from consumers.persistence import apply_events, create_pool
from consumers.registry import PROJECTIONS
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from schemas.topology import RUN_METRIC
from tests.conftest import wait_until

TRIALS = PROJECTIONS["trials"]
TABLES = ("trials", "trial_metrics")


def a_study(model_run_id: str = "pruned") -> list[list]:
    return synthetic_study(4, 5, producer=producer_info(), model_run_id=model_run_id, seed=3)


async def _apply(env, projection, events) -> int:
    conn = await env.db()
    try:
        async with conn.transaction():
            return await apply_events(conn, projection, events)
    finally:
        await conn.close()


async def _prune(env, keep: int) -> int:
    pool = await create_pool(env.settings.database_url)
    try:
        deleted, _ = await pruning.prune(pool, TRIALS.name, TRIALS.idempotent_types, keep=keep)
        return deleted
    finally:
        await pool.close()


def _metrics(events) -> list:
    return [e for e in events if e.event_type == RUN_METRIC]


async def test_only_journaled_metric_rows_are_pruned(env):
    *journaled, late = a_study()
    events = [e for trial in [*journaled, late] for e in trial]
    await _apply(env, TRIALS, events)
    await _apply(env, PROJECTIONS["journal"], [e for trial in journaled for e in trial])  # `late`: not yet journaled
    assert await _prune(env, keep=0) == len(_metrics(e for trial in journaled for e in trial))
    kept = {r["event_id"] for r in await env.fetch("SELECT event_id FROM applied_events WHERE projection = 'trials'")}
    assert kept == {e.event_id for e in events if e.event_type != RUN_METRIC or e in late}
    assert await _prune(env, keep=0) == 0


async def test_pruned_metric_rows_are_redelivered_as_no_ops_and_replay_still_equals_live(env):
    events = [e for trial in a_study() for e in trial]
    await _apply(env, TRIALS, events)
    await _apply(env, PROJECTIONS["journal"], events)
    before = await env.snapshot(*TABLES)
    assert await _prune(env, keep=0) == len(_metrics(events))
    assert await _apply(env, TRIALS, events) == len(_metrics(events))  # applied again: the pruned ones, as no-ops
    assert await env.snapshot(*TABLES) == before
    assert await _prune(env, keep=0) == len(_metrics(events))
    result = await env.replay("trials")  # its swap finds no applied event missing from the journal
    assert result.events == len(events)
    assert await env.snapshot(*TABLES) == before
    assert await _prune(env, keep=0) == len(_metrics(events))  # the rows the swap put back


async def test_the_newest_rows_are_kept_so_lag_stays_exact(env):
    *done, running = a_study()
    events = [e for trial in done for e in trial] + running[:-1]  # the last trial has not stopped yet
    await _apply(env, TRIALS, events)
    await _apply(env, PROJECTIONS["journal"], events)
    bindings = [(TRIALS.name, TRIALS.queue.bindings)]
    trailing = len(_metrics(running))
    conn = await env.db()
    try:
        assert await _prune(env, keep=trailing) == len(_metrics(events)) - trailing
        assert [lag.events for lag in await lags(conn, bindings)] == [0]
        await _prune(env, keep=0)  # without the window: the newest row left is the running trial's start
        assert [lag.events for lag in await lags(conn, bindings)] == [trailing]
    finally:
        await conn.close()


@pytest.mark.usefixtures("fast_pruning")
async def test_the_daemon_prunes_in_the_background(env):
    events = [e for trial in a_study("daemon") for e in trial]
    config = dataclasses.replace(env.settings.consumer(), prune_every_s=0.2)
    async with running_consumers(config, ["journal", "trials"]):
        for event in events:
            await env.publish_raw([event.to_json()], routing_key=event.event_type)
        await wait_until(lambda: env.has_applied("journal", len(events)), what="the journal")
        starts_and_stops, metrics = len(events) - len(_metrics(events)), len(_metrics(events))

        async def pruned() -> bool:
            return (await env.fetchval("SELECT count(*) FROM trial_metrics") == metrics
                    and await env.has_applied("trials", starts_and_stops))

        await wait_until(pruned, what="every metric applied and its row pruned")


@pytest.fixture
def fast_pruning(monkeypatch):
    monkeypatch.setattr(pruning, "KEEP", 0)


async def test_the_background_pruning_walks_from_the_start_again_for_rows_a_replay_put_back(env, monkeypatch):
    monkeypatch.setattr(pruning, "KEEP", 0)
    monkeypatch.setattr(pruning, "FULL_PASS_EVERY", 3)
    events = [e for trial in a_study() for e in trial]
    await _apply(env, TRIALS, events)
    await _apply(env, PROJECTIONS["journal"], events)
    starts_and_stops = len(events) - len(_metrics(events))
    pool = await create_pool(env.settings.database_url)
    task = asyncio.create_task(pruning.keep_pruning(pool, TRIALS, 0.05))
    try:
        await wait_until(lambda: env.has_applied("trials", starts_and_stops), what="the first pass")
        # Its swap puts every row back (the test above), below the position the passes reached; without the walk from
        # the start, they would stay.
        await env.replay("trials")
        await wait_until(lambda: env.has_applied("trials", starts_and_stops), what="a pass from the start")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pool.close()


async def test_pruning_makes_the_space_reusable(env):
    """Without the VACUUM after a pass (autovacuum is off on some servers), the heap would double here."""
    first, second = (synthetic_study(200, 10, producer=producer_info(), model_run_id=name, seed=1)
                     for name in ("space-a", "space-b"))
    sizes = []
    for study in (first, second):
        events = [e for trial in study for e in trial]
        await _apply(env, TRIALS, events)
        await _apply(env, PROJECTIONS["journal"], events)
        assert await _prune(env, keep=0) == len(_metrics(events))
        sizes.append(await env.fetchval("SELECT pg_relation_size('applied_events')"))
    assert sizes[1] < 1.3 * sizes[0], sizes
