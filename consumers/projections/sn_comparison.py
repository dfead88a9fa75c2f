"""The `sn_comparison` aggregates (consumers/sql/003_comparison.sql), fed by stop events only.

A stop is self-contained (it repeats the spectral_norm flag and carries the final measurements), so each stop adds
one trial to two rows: its search's and the overall row (model_run_id = OVERALL). Every column is a commutative
increment (counts and exact numeric sums add, min/max through LEAST/GREATEST), so the rows do not depend on the
order the stops arrive in; the runtime applies each event exactly once, so redeliveries never count twice.
Values travel as the decimal text the event carries (Decimal(repr(x)) is the JSON number), and squares and the
train-val gap are computed by PostgreSQL in `numeric`: live, replayed and recomputed-from-`trials` figures are
equal to the last digit.
"""

from __future__ import annotations

from decimal import Decimal

from consumers.projections.base import Projection, Statement
from consumers.projections.comparison_keys import OVERALL, STATS
from consumers.topology import QueueSpec
from schemas import Event, RunStopped
from schemas.topology import RUN_STOP


def _columns(prefix: str) -> str:
    return f"{prefix}_n, {prefix}_sum, {prefix}_sum_sq, {prefix}_min, {prefix}_max"


def _increments(prefix: str) -> str:
    return (f"{prefix}_n = c.{prefix}_n + EXCLUDED.{prefix}_n, "
            f"{prefix}_sum = c.{prefix}_sum + EXCLUDED.{prefix}_sum, "
            f"{prefix}_sum_sq = c.{prefix}_sum_sq + EXCLUDED.{prefix}_sum_sq, "
            f"{prefix}_min = LEAST(c.{prefix}_min, EXCLUDED.{prefix}_min), "
            f"{prefix}_max = GREATEST(c.{prefix}_max, EXCLUDED.{prefix}_max)")


def _values(column: str) -> str:
    return f"({column} IS NOT NULL)::int, COALESCE({column}, 0), COALESCE({column} * {column}, 0), {column}, {column}"


ADD_STOP = f"""
INSERT INTO sn_comparison AS c (model_run_id, spectral_norm, status, trials, {", ".join(map(_columns, STATS))})
SELECT $1, $2, $3, 1, {", ".join(_values(s) for s in STATS)}
FROM (SELECT $4::numeric AS val, $5::numeric - $4::numeric AS gap, $6::numeric AS duration) AS stop
ON CONFLICT (model_run_id, spectral_norm, status) DO UPDATE SET
    trials = c.trials + 1,
    {", ".join(map(_increments, STATS))}
"""


def _aggregates(prefix: str) -> str:
    # LEAST/GREATEST keep the earlier of equal values: 0.5 and 0.50 are equal but print differently (a gap's scale is
    # its operands'), so the minimum is the first one by position among the smallest, as applied in position order.
    return (f"count({prefix}), sum(COALESCE({prefix}, 0)), sum(COALESCE({prefix} * {prefix}, 0)), "
            f"(array_agg({prefix} ORDER BY {prefix}, position) FILTER (WHERE {prefix} IS NOT NULL))[1], "
            f"(array_agg({prefix} ORDER BY {prefix} DESC, position) FILTER (WHERE {prefix} IS NOT NULL))[1]")


# The set-based rebuild (consumers/bulk.py): every stop counted once in its search's row and in the overall row, from
# the numbers as the journal's jsonb holds them (the decimal text the event carried, as Decimal(repr(x)) reads it).
BULK_STOPS = f"""
INSERT INTO sn_comparison (model_run_id, spectral_norm, status, trials, {", ".join(map(_columns, STATS))})
SELECT CASE WHEN GROUPING(model_run_id) = 1 THEN '{OVERALL}' ELSE model_run_id END, spectral_norm, status, count(*),
       {", ".join(map(_aggregates, STATS))}
FROM (
    SELECT e.position, e.model_run_id, (p ->> 'spectral_norm')::boolean AS spectral_norm, p ->> 'status' AS status,
           (p -> 'measurements' -> 'final_val_accuracy')::numeric AS val,
           (p -> 'measurements' -> 'final_train_accuracy')::numeric
               - (p -> 'measurements' -> 'final_val_accuracy')::numeric AS gap,
           (p -> 'measurements' -> 'duration_ms')::numeric AS duration
    FROM {{journal}} e CROSS JOIN LATERAL (SELECT e.envelope -> 'payload' AS p) stop
    WHERE e.event_type = '{RUN_STOP}'
) stops
GROUP BY GROUPING SETS ((model_run_id, spectral_norm, status), (spectral_norm, status))
"""


def _decimal(value: float | None) -> Decimal | None:
    return None if value is None else Decimal(repr(value))


class ComparisonProjection(Projection):
    name = "comparison"
    queue = QueueSpec("sntrack.comparison", bindings=(RUN_STOP,))
    tables = ("sn_comparison",)
    bulk = (BULK_STOPS,)
    bulk_versions = {RUN_STOP: frozenset({1})}

    def project(self, event: Event):
        if not isinstance(event, RunStopped):
            return
        p = event.payload
        m = p.measurements
        values = (_decimal(m.get("final_val_accuracy")), _decimal(m.get("final_train_accuracy")),
                  _decimal(m.get("duration_ms")))
        for scope in (event.model_run_id, OVERALL):
            yield Statement(ADD_STOP, (scope, p.spectral_norm, p.status, *values))
