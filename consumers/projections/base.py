"""What a projection is: a name, its queue, its tables, and `project(event)` → SQL statements.

`project` is pure: it turns one event into the writes it implies. The runtime (consumers.persistence.Store)
runs those writes for a whole batch in one transaction together with the record of which events were
applied, so a projection never deals with redelivery, duplicates or "already seen" bookkeeping.
Statements must be commutative per trial (upserts that keep the newest by seq, sums, LEAST/GREATEST):
a projection is fed in any order and must end in the same rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
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

    @abstractmethod
    def project(self, event: Event) -> Iterable[Statement]: ...
