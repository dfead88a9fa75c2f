"""Latency percentiles, computed one way for every benchmark."""

from __future__ import annotations

import statistics


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    """n, p50, p95 and p99 (inclusive quantiles) of at least two samples, in ms rounded to 0.01."""
    cuts = statistics.quantiles(samples_ms, n=100, method="inclusive")
    return {"n": len(samples_ms), "p50": round(cuts[49], 2), "p95": round(cuts[94], 2), "p99": round(cuts[98], 2)}
