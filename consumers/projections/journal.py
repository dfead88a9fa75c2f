"""The append-only `events` journal: every valid event once, in arrival order (`position`)."""

from __future__ import annotations

from consumers.projections.base import Projection, Statement
from consumers.topology import QueueSpec
from schemas import Event

INSERT_EVENT = """
INSERT INTO events (event_id, event_type, trial_id, model_run_id, seq, schema_version, occurred_at, envelope)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb)
ON CONFLICT (event_id) DO NOTHING
"""


class JournalProjection(Projection):
    name = "journal"
    queue = QueueSpec("sntrack.journal")
    replayable = False  # it is the source every replay reads
    dedupes_itself = True  # ON CONFLICT (event_id) DO NOTHING: a row per event in applied_events would only repeat it

    def project(self, event: Event):
        yield Statement(
            INSERT_EVENT,
            (event.event_id, event.event_type, event.trial_id, event.model_run_id, event.seq,
             event.schema_version, event.occurred_at, event.model_dump_json()),
        )
