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
