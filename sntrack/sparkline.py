"""A learning curve in one line of the terminal."""

from __future__ import annotations

import math

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], low: float | None = None, high: float | None = None) -> str:
    """One block character per value, scaled between `low` and `high` (the values' own range by default);
    a missing or non-finite value is a space."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low = min(finite) if low is None else low
    high = max(finite) if high is None else high
    span = high - low
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        else:
            level = 0 if span <= 0 else round((min(max(v, low), high) - low) / span * (len(BARS) - 1))
            out.append(BARS[level])
    return "".join(out)
