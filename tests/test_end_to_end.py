"""200 trials × 20 epochs through the real broker and consumers; then replay equals live, row for row."""

import json
import os
import subprocess
import sys

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until

TABLES = ("trials", "trial_metrics")


def cli_env(env) -> dict[str, str]:
    return {**os.environ, **env.settings.to_env()}


async def test_every_event_lands_exactly_once_and_replay_equals_live(env):
    study = synthetic_study(200, 20, producer=producer_info(), seed=2)
    events = [e for trial in study for e in trial]
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        await env.publish_events(events, duplicates=300)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal",
                         timeout=120)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM applied_events WHERE projection = 'trials'",
                                              len(events)), what="trials", timeout=120)

    journal = await env.fetch("SELECT event_id, seq, trial_id FROM events")
    assert sorted(str(r["event_id"]) for r in journal) == sorted(str(e.event_id) for e in events)

    trials = {r["id"]: r for r in await env.fetch("SELECT * FROM trials")}
    assert len(trials) == 200
    for trial in study:
        start, stop = trial[0], trial[-1]
        row = trials[start.trial_id]
        assert row["spectral_norm"] is start.payload.spectral_norm
        assert row["status"] == stop.payload.status
        assert row["seed"] == start.payload.seed
        assert row["duration_ms"] == stop.payload.measurements["duration_ms"]
        assert json.loads(row["metrics"]) == stop.payload.measurements and row["last_seq"] == stop.seq
        assert row["started_at"] == start.occurred_at and row["finished_at"] == stop.occurred_at
    curve = await env.fetch("SELECT trial_id, epoch, val_accuracy FROM trial_metrics")
    sent = {(e.trial_id, e.payload.epoch): e.payload.splits["val"]["accuracy"]
            for e in events if e.event_type == "ml.run.metric"}
    assert {(r["trial_id"], r["epoch"]): r["val_accuracy"] for r in curve} == sent

    live = await env.snapshot(*TABLES)
    result = await env.replay("trials")
    assert result.events == len(events)
    assert await env.snapshot(*TABLES) == live


def test_journal_cannot_be_replayed(env):
    run = subprocess.run([sys.executable, "-m", "sntrack", "replay", "journal"], env=cli_env(env),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "invalid choice" in run.stderr
