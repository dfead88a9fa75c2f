"""Where and whether the effect varies: Holm's adjustment, the paired effect against a hyper-parameter (Spearman and
quantile buckets), the arm × parameter interaction of independent trials, and the inverse-variance pooling of
per-stratum differences with Cochran's Q and I². tests/test_heterogeneity.py checks each against scipy/statsmodels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consumers.report import special_stats as ss
from consumers.report.stats import (
    Difference,
    TestResult,
    mean_difference,
    paired_t,
    t_sf,
    welch_difference,
    welch_test,
)

BUCKETS = 4


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); None stays None and is not counted."""
    known = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def spearman(x: Sequence[float], y: Sequence[float]) -> TestResult:
    """Spearman's ρ with its two-sided p (scipy's t approximation); undefined under 3 points or a constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return TestResult()
    result = ss.spearmanr(x, y)
    return TestResult(float(result.statistic), float(result.pvalue))


@dataclass(frozen=True)
class Bucket:
    label: str
    difference: Difference
    n: int


def numeric(values: Sequence[object]) -> bool:
    """Every value a JSON number (bool is its own type, so it is not one)."""
    return all(issubclass(k, int | float) and not issubclass(k, bool) for k in set(map(type, values)))


def bucketize(values: Sequence[object]) -> list[tuple[str, np.ndarray]]:
    """(label, mask) per quantile bucket of a numeric parameter (up to BUCKETS buckets of about equal size; equal
    values stay in one bucket, the last bucket is closed), or per category otherwise."""
    if numeric(values):
        x = np.asarray(values, dtype=float)
        edges = np.unique(np.quantile(x, np.linspace(0, 1, BUCKETS + 1)))
        if len(edges) < 2:
            return []
        index = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
        last = len(edges) - 2
        return [(f"[{edges[k]:.4g}, {edges[k + 1]:.4g}{']' if k == last else ')'}", index == k)
                for k in range(len(edges) - 1) if (index == k).any()]
    labels = np.asarray([repr(v) for v in values])
    return [(label, labels == label) for label in sorted(set(labels))]


def paired_buckets(values: Sequence[object], differences: Sequence[float]) -> list[Bucket]:
    """Mean paired difference with its 95% CI per bucket of the parameter (see `bucketize`)."""
    d = np.asarray(differences, dtype=float)
    return [Bucket(label, mean_difference(d[mask]), int(mask.sum())) for label, mask in bucketize(values)]


def independent_buckets(values: Sequence[object], arm: Sequence[bool], outcome: Sequence[float]) -> list[Bucket]:
    """Welch's difference SN − baseline with its 95% CI per bucket of the parameter over both arms' trials."""
    a, y = np.asarray(arm, dtype=bool), np.asarray(outcome, dtype=float)
    return [Bucket(label, welch_difference(y[mask & a], y[mask & ~a]), int(mask.sum()))
            for label, mask in bucketize(values)]


def interaction(values: Sequence[float], arm: Sequence[bool], outcome: Sequence[float]) -> TestResult:
    """OLS outcome ~ 1 + arm + x + arm·x: the interaction coefficient (how much the arm's effect changes per unit of
    x), its t statistic and two-sided p. Undefined when the design is singular."""
    x = np.asarray(values, dtype=float)
    a = np.asarray(arm, dtype=float)
    y = np.asarray(outcome, dtype=float)
    design = np.column_stack([np.ones_like(x), a, x, a * x])
    df = len(y) - design.shape[1]
    if df < 1 or np.linalg.matrix_rank(design) < design.shape[1]:
        return TestResult()
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ coef
    sigma2 = float(residual @ residual) / df
    se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[3, 3])
    if se == 0:
        return TestResult()
    t = float(coef[3]) / se
    return TestResult(float(coef[3]), 2 * t_sf(abs(t), df), float(df))


@dataclass(frozen=True)
class Pooled:
    """Fixed-effect inverse-variance mean of per-stratum differences, its 95% normal interval and p, Cochran's Q
    with its p, and I² = max(0, (Q − df) / Q)."""

    estimate: float | None = None
    se: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_value: float | None = None
    q: float | None = None
    q_p_value: float | None = None
    i_squared: float | None = None
    strata: int = 0


def inverse_variance(estimates: Sequence[float], ses: Sequence[float]) -> Pooled:
    kept = [(e, s) for e, s in zip(estimates, ses, strict=True) if e is not None and s]
    if not kept:
        return Pooled()
    e = np.asarray([k[0] for k in kept])
    w = 1 / np.asarray([k[1] for k in kept]) ** 2
    mean = float((w * e).sum() / w.sum())
    se = math.sqrt(1 / float(w.sum()))
    z = ss.norm_isf(0.025)
    p = float(2 * ss.norm_sf(abs(mean / se)))
    if len(kept) < 2:
        return Pooled(mean, se, mean - z * se, mean + z * se, p, strata=1)
    q = float((w * (e - mean) ** 2).sum())
    df = len(kept) - 1
    i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
    return Pooled(mean, se, mean - z * se, mean + z * se, p, q, ss.chi2_sf(q, df), i2, len(kept))


def stratum_difference(a: Sequence[float], b: Sequence[float], is_paired: bool) -> tuple[Difference, TestResult]:
    """A stratum's difference and its t-test, by the scope's design."""
    if is_paired:
        return paired_t(a, b)
    return welch_difference(a, b), welch_test(a, b)
