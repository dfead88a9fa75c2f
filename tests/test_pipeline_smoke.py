import dataclasses
import json

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until


async def test_events_reach_journal_and_trials(env):
    study = synthetic_study(5, 4, producer=producer_info())
    events = [e for trial in study for e in trial]
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        for e in events:
            await env.publish_raw([e.to_json()], routing_key=e.event_type)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")
        await wait_until(lambda: env.fetchval("SELECT count(*) = 5 FROM trials WHERE status <> 'running'"))
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == sum(len(t) - 2 for t in study)


async def test_stage_log_stamps_each_batch_s_stages_in_path_order(env, tmp_path):
    study = synthetic_study(3, 4, producer=producer_info())
    events = [e for trial in study for e in trial]
    config = dataclasses.replace(env.settings.consumer(), stage_log=tmp_path / "stages")
    async with running_consumers(config, ["trials"]):
        for e in events:
            await env.publish_raw([e.to_json()], routing_key=e.event_type)
        await wait_until(lambda: env.fetchval("SELECT count(*) = 3 FROM trials WHERE status <> 'running'"))
    batches = [json.loads(line) for line in (tmp_path / "stages" / "trials.jsonl").read_text().splitlines()]
    assert sorted(event_id for b in batches for event_id, _ in b["events"]) == sorted(str(e.event_id) for e in events)
    for batch in batches:
        names = [name for name, _ in batch["marks"]]
        assert names == ["taken", "gated", "acquired", "begun", "recorded", "projected", "committed",
                         "acked"]
        stamps = [arrived for _, arrived in batch["events"]] + [at for _, at in batch["marks"]]
        assert max(stamps[:len(batch["events"])]) <= stamps[len(batch["events"])]  # arrived before taken
        assert stamps[len(batch["events"]):] == sorted(stamps[len(batch["events"]):])
