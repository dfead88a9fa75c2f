"""Every consumer that `sntrack consume all` runs, by name, with the queue it reads."""

from __future__ import annotations

from consumers.projections.journal import JournalProjection
from consumers.projections.trials import TrialsProjection

PROJECTIONS = {p.name: p for p in (JournalProjection(), TrialsProjection())}
QUEUES = tuple(p.queue for p in PROJECTIONS.values())
