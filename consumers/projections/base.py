"""What a projection is: a name, its queue, its tables, and `project(event)` → SQL statements.

`project` is pure: it turns one event into the writes it implies. The runtime (consumers.persistence.Store)
runs those writes for a whole batch in one transaction together with the record of which events were
applied, so a projection never deals with redelivery, duplicates or "already seen" bookkeeping.
Statements must be commutative per trial (upserts that keep the newest by seq, sums, LEAST/GREATEST):
a projection is fed in any order and must end in the same rows.

A projection may also give `bulk`: INSERT … SELECT statements that build its tables, empty, from a whole journal at
once (consumers/bulk.py), giving the rows `project` gives applied in position order. `sntrack replay` uses them when
every event in the journal is of a (type, version) listed in `bulk_versions`, and `project` otherwise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from pydantic_core import to_json

from consumers.topology import QueueSpec
from schemas import Event


def jsonb(value: object) -> str:
    """Text for a `$n::jsonb` parameter (pydantic-core's encoder: ~5x faster than json.dumps here)."""
    return to_json(value).decode()


class Statement(NamedTuple):
    sql: str
    args: tuple


class Projection(ABC):
    name: str
    queue: QueueSpec
    # Rebuilt from the journal into shadow copies and swapped in, locked in this order (consumers/replay.py).
    tables: tuple[str, ...] = ()
    replayable: bool = True
    # Its own writes skip an event they already hold (the journal's UNIQUE event_id): the runtime then keeps no
    # applied_events row for it, only leaving out the events of a study removed for good. Only the journal sets it:
    # lag (consumers/lag.py) and replay read a projection's progress from those rows.
    dedupes_itself: bool = False
    # Its writes to a trial read other rows of that trial (trials: the summary of a stopped trial's curve): two
    # daemons applying batches at once would each miss the other's uncommitted write. The bookkeeping statement then
    # first takes the lock of every trial of the batch, and the statements after it see what the previous holder
    # committed (persistence.RECORD_LOCK_AND_NOTIFY; tests/test_two_daemons.py).
    locks_trials: bool = False
    # Event types `project` applies idempotently: applying one again is a no-op whatever was applied in between.
    # Their applied_events rows are pruned once the journal holds the event (consumers/pruning.py).
    idempotent_types: frozenset[str] = frozenset()
    # Set-based rebuild (consumers/bulk.py): SQL over the relation `{journal}`, and the versions of each event type
    # it reads. Empty: replay runs `project` over every event.
    bulk: tuple[str, ...] = ()
    bulk_versions: Mapping[str, frozenset[int]] = {}

    @abstractmethod
    def project(self, event: Event) -> Iterable[Statement]: ...
