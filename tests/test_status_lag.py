"""`sntrack status` shows each consumer's lag on the journal and its dead letters, in the table and as JSON."""

from __future__ import annotations

import json
import re

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.test_studies import sntrack


def _status_json(env) -> dict:
    run = sntrack(env, "status", "--format", "json")
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


async def test_status_shows_lag_and_dead_letters(env):
    events = [e for t in synthetic_study(3, 2, producer=producer_info(), seed=12) for e in t]
    async with running_consumers(env.settings.consumer(), ["journal"]):  # trials is not running: it lags by all
        await env.publish_events(events)
        await env.publish_raw([b"{not json"])
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", len(events)), what="journal")

        def settled(doc: dict) -> dict | None:  # the management API refreshes its figures every 5 s
            queues = {q["consumer"]: q for q in doc["queues"]}
            return queues if queues["journal"]["dead_letters"] == 1 and queues["trials"]["ready"] else None

        queues = await wait_until(lambda: settled(_status_json(env)), timeout=30, what="figures")
    assert queues["journal"]["lag_events"] == 0 and queues["journal"]["position"] == len(events)
    assert queues["trials"]["lag_events"] == len(events) and queues["trials"]["position"] == 0
    assert queues["comparison"]["lag_events"] == 3  # its queue takes stop events only
    assert queues["trials"]["dead_letters"] == 0 and queues["trials"]["ready"] == len(events) + 1

    table = sntrack(env, "status")
    assert table.returncode == 0, table.stderr
    assert re.search(rf"sntrack\.trials\s+ready={len(events) + 1}\s.*lag={len(events)}\s+dlq=0", table.stdout)
    assert re.search(r"sntrack\.journal\s+ready=0\s.*lag=0\s+dlq=1", table.stdout), table.stdout
