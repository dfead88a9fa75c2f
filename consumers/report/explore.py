"""Where spectral normalization helps (exploratory: many parameters are looked at, so read it as hypotheses).

Paired design: each pair's difference against the pair's hyper-parameter — Spearman's ρ for numbers (on the log
scale changes nothing, ranks are ranks), Kruskal–Wallis across categories otherwise — with the mean difference per
quantile bucket or category. Independent design: the arm × parameter interaction of an OLS fit (x on the log10 scale
when it is positive and spans more than two decades, as learning rates do), with Welch's difference per bucket.
Holm's correction runs across the parameters tested.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from operator import itemgetter

import numpy as np

from consumers.report import heterogeneity as het
from consumers.report.special_stats import kruskal
from consumers.report.stats import ALPHA, TestResult

SKIP = frozenset({"spectral_norm"})
LOG_SPAN = 100.0  # max / min beyond which a positive parameter is related on the log scale


def _scaled(values: Sequence[float]) -> tuple[np.ndarray, str]:
    x = np.asarray(values, dtype=float)
    if x.min() > 0 and x.max() / x.min() > LOG_SPAN:
        return np.log10(x), "log10"
    return x, "linear"


def _kruskal(values: Sequence[object], differences: np.ndarray) -> TestResult:
    groups = [differences[mask] for _, mask in het.bucketize(values)]
    if len(groups) < 2 or np.ptp(differences) == 0:
        return TestResult()
    result = kruskal(*groups)
    return TestResult(float(result.statistic), float(result.pvalue), float(len(groups) - 1))


def _varies(values: list) -> bool:
    """At least two distinct values, as their repr tells them apart (1 and 1.0, 0.0 and -0.0 differ)."""
    first = values[0]
    if type(first) in (int, str, bool, float, type(None)) and first == first and len(set(map(type, values))) == 1:
        # Values of one such type that are not equal print differently (first is no NaN); equal ones print alike,
        # but for 0.0 and -0.0, which take the long way.
        if values.count(first) < len(values):
            return True
        if type(first) is not float or first != 0:
            return False
    return len({repr(v) for v in values}) > 1


def _parameters(hyperparams: Sequence[dict]) -> list[str]:
    """Parameters every unit has and that take at least two values."""
    names = set(hyperparams[0]).intersection(*hyperparams) - SKIP if hyperparams else set()
    return sorted(n for n in names if _varies(list(map(itemgetter(n), hyperparams))))


def _entry(name: str, test: str, scale: str, result: TestResult, buckets: list[het.Bucket]) -> dict:
    return {"hyperparam": name, "test": test, "scale": scale, "statistic": result.statistic,
            "p_value": result.p_value, "p_holm": None,
            "buckets": [{"label": b.label, "n": b.n, **asdict(b.difference)} for b in buckets]}


def paired(hyperparams: Sequence[dict], differences: Sequence[float]) -> list[dict]:
    d = np.asarray(differences, dtype=float)
    out = []
    for name in _parameters(hyperparams):
        values = list(map(itemgetter(name), hyperparams))
        if het.numeric(values):
            x, scale = _scaled(values)
            out.append(_entry(name, "spearman", scale, het.spearman(x, d), het.paired_buckets(values, d)))
        else:
            out.append(_entry(name, "kruskal", "categories", _kruskal(values, d), het.paired_buckets(values, d)))
    return out


def independent(hyperparams: Sequence[dict], arm: Sequence[bool], outcome: Sequence[float]) -> list[dict]:
    out = []
    for name in _parameters(hyperparams):
        values = list(map(itemgetter(name), hyperparams))
        buckets = het.independent_buckets(values, arm, outcome)
        if het.numeric(values):
            x, scale = _scaled(values)
            out.append(_entry(name, "interaction", scale, het.interaction(x, arm, outcome), buckets))
        else:
            out.append(_entry(name, "none", "categories", TestResult(), buckets))
    return out


def where_it_helps(entries: list[dict], design: str, alpha: float = ALPHA) -> dict:
    """Holm-adjusts the entries' p-values and names the most related parameter (smallest adjusted p)."""
    for entry, adjusted in zip(entries, het.holm([e["p_value"] for e in entries]), strict=True):
        entry["p_holm"] = adjusted
    tested = [e for e in entries if e["p_holm"] is not None]
    best = min(tested, key=lambda e: e["p_holm"], default=None)
    return {"exploratory": True, "design": design, "correction": "holm", "parameters": entries,
            "most_related": best["hyperparam"] if best else None,
            "related": [e["hyperparam"] for e in tested if e["p_holm"] < alpha]}
