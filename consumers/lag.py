"""How far behind a consumer is, measured on the journal (for `sntrack status` and the daemons' /metrics).

A consumer's position is the journal position (events.position) of the newest journal event, among the event
types its queue is bound to, that it has applied (applied_events). Its lag is the number of journal events of those
types after that position: the journal head minus the position, counted in events. The walk goes from the head
backwards and stops at the first applied event, so it costs as much as the lag itself.

What this leaves out, on purpose: an event applied out of order below the position (a dead letter, a retry) is not
lag (the queue and dead-letter depths show it), and a consumer ahead of the journal consumer has lag 0. The journal
consumer's own position is the head: its lag is its queue depth.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import asyncpg

from consumers.topology import QueueSpec
from schemas.topology import ROUTING_KEYS

JOURNAL = "journal"  # consumers.projections.journal.JournalProjection.name (not imported: no event models here)

LAG_SQL = """
WITH pos AS (
    SELECT coalesce((SELECT e.position FROM events e
                     WHERE e.event_type = ANY($2::text[])
                       AND EXISTS (SELECT 1 FROM applied_events a WHERE a.projection = $1 AND a.event_id = e.event_id)
                     ORDER BY e.position DESC LIMIT 1), 0) AS position
)
SELECT pos.position,
       (SELECT count(*) FROM events e WHERE e.position > pos.position AND e.event_type = ANY($2::text[])) AS lag
FROM pos
"""


def topic_matches(pattern: str, key: str) -> bool:
    """AMQP topic matching: `*` is exactly one word, `#` zero or more."""
    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return match(p[1:], k) or (bool(k) and match(p, k[1:]))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])
    return match(pattern.split("."), key.split("."))


def routed_types(bindings: Iterable[str]) -> list[str]:
    """The event types (routing keys) a queue with these bindings receives."""
    patterns = list(bindings)
    return [key for key in ROUTING_KEYS if any(topic_matches(p, key) for p in patterns)]


@dataclass(frozen=True)
class Lag:
    consumer: str
    position: int
    events: int


def consumer_queues() -> list[tuple[str, QueueSpec]]:
    """Every consumer `sntrack consume` can run, by name, with its queue."""
    from consumers.registry import PROJECTIONS, SIDE_EFFECTS  # the registry imports every handler

    return [(n, p.queue) for n, p in PROJECTIONS.items()] + [(n, c.queue) for n, c in SIDE_EFFECTS.items()]


async def journal_head(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(position), 0) FROM events")


async def lags(conn: asyncpg.Connection, consumers: Sequence[tuple[str, Iterable[str]]]) -> list[Lag]:
    """For each (consumer name, its queue's bindings): its position and lag on the journal."""
    out = []
    for name, bindings in consumers:
        if name == JOURNAL:  # it keeps no applied_events rows (it dedupes itself), and its position is the head
            out.append(Lag(name, await journal_head(conn), 0))
            continue
        row = await conn.fetchrow(LAG_SQL, name, routed_types(bindings))
        out.append(Lag(name, row["position"], row["lag"]))
    return out
