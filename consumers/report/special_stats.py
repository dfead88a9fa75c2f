"""The report's scipy.stats calls, computed from scipy.special and numpy so that scipy.stats need not be imported.

Importing scipy.stats costs about 0.35 s of CPU beyond scipy.special. Each function here reproduces one scipy.stats
1.17.1 call in the regime the report uses (finite values, large samples): the same formulas, tie and continuity
corrections, method selection and order of floating-point operations, so the numbers are scipy's. Where scipy would
use an exact or permutation method, or an input is empty, non-finite or degenerate, the function calls scipy.stats
itself, so its behaviour (values, warnings, errors) never differs from scipy's.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from consumers.report.lazy_stats import special, stats

if TYPE_CHECKING:
    from collections.abc import Callable

    from numpy.typing import ArrayLike

# scipy.stats.fisher_exact's relative tolerance when it compares probabilities of tables.
FISHER_EPSILON = 1e-14
# The largest sample for which scipy.stats.wilcoxon (method 'auto') may use its exact distribution; with ties or
# zeros, the largest for which it runs an exhaustive permutation test (2**13 < its 9999 resamples).
WILCOXON_EXACT_MAX_N = 50
WILCOXON_PERMUTATION_MAX_N = 13
# scipy.stats.mannwhitneyu (method 'auto') uses its exact distribution unless both samples exceed this (or ties).
MANNWHITNEYU_EXACT_MAX_N = 8
# The scipy release whose formulas, method choices and private Boost routines these functions reproduce
# (tests/test_special_stats.py checks them against it). With any other, every function calls scipy.stats.
REPRODUCED_SCIPY = (1, 17)


class Result(NamedTuple):
    statistic: float
    pvalue: float


class ContingencyResult(NamedTuple):
    statistic: float
    pvalue: float
    dof: int


def _delegated(result) -> Result:
    return Result(float(result.statistic), float(result.pvalue))


@functools.cache
def reproduces_scipy() -> bool:
    """Whether the installed scipy is the release these functions reproduce: the guards below are all false
    otherwise, so that every call goes to scipy.stats, whose version then decides."""
    import scipy

    return tuple(map(int, scipy.__version__.split(".")[:2])) == REPRODUCED_SCIPY


# The guards of the own computations: each is false where scipy.stats must answer instead.


def _finite(*values: float) -> bool:
    return reproduces_scipy() and all(math.isfinite(v) for v in values)


def _positive(*values: float) -> bool:
    return reproduces_scipy() and all(0 < v < math.inf for v in values)


def _open_unit(q: float) -> bool:
    return reproduces_scipy() and 0 < q < 1


def _sample(values: ArrayLike) -> np.ndarray | None:
    """`values` as a 1-d float array, or None where scipy's own handling is needed (not 1-d, empty, non-finite, or
    another scipy release)."""
    x = np.asarray(values, dtype=float)
    if not reproduces_scipy() or x.ndim != 1 or x.size == 0 or not np.all(np.isfinite(x)):
        return None
    return x


def _samples(groups: tuple[ArrayLike, ...]) -> list[np.ndarray] | None:
    arrays = [_sample(g) for g in groups]
    if len(arrays) < 2 or any(a is None for a in arrays):
        return None
    return arrays


# Distributions


def norm_cdf(x: float) -> float:
    """stats.norm.cdf(x): special.ndtr(x) for a finite x."""
    if _finite(x):
        return float(special.ndtr(x))
    return float(stats.norm.cdf(x))


def norm_sf(x: float) -> float:
    """stats.norm.sf(x): special.ndtr(-x) for a finite x."""
    if _finite(x):
        return float(special.ndtr(-x))
    return float(stats.norm.sf(x))


def norm_ppf(q: float) -> float:
    """stats.norm.ppf(q): special.ndtri(q) for 0 < q < 1."""
    if _open_unit(q):
        return float(special.ndtri(q))
    return float(stats.norm.ppf(q))


def norm_isf(q: float) -> float:
    """stats.norm.isf(q): -special.ndtri(q) for 0 < q < 1."""
    if _open_unit(q):
        return float(-special.ndtri(q) + 0.0)  # scipy's `* scale + loc` makes the −0.0 at q = 0.5 a 0.0
    return float(stats.norm.isf(q))


def chi2_sf(x: float, df: float) -> float:
    """stats.chi2.sf(x, df): special.chdtrc(df, x) for a finite x > 0 and a finite df > 0."""
    if _positive(x, df):
        return float(special.chdtrc(df, x))
    return float(stats.chi2.sf(x, df))


def f_sf(x: float, dfn: float, dfd: float) -> float:
    """stats.f.sf(x, dfn, dfd): special.fdtrc(dfn, dfd, x) for a finite x > 0 and finite dfn, dfd > 0."""
    if _positive(x, dfn, dfd):
        return float(special.fdtrc(dfn, dfd, x))
    return float(stats.f.sf(x, dfn, dfd))


def f_ppf(q: float, dfn: float, dfd: float) -> float:
    """stats.f.ppf(q, dfn, dfd): special.fdtri(dfn, dfd, q) for 0 < q < 1 and finite dfn, dfd > 0."""
    if _open_unit(q) and _positive(dfn, dfd):
        return float(special.fdtri(dfn, dfd, q))
    return float(stats.f.ppf(q, dfn, dfd))


def f_isf(q: float, dfn: float, dfd: float) -> float:
    """stats.f.isf(q, dfn, dfd): special.fdtri(dfn, dfd, 1 - q) for 0 < q < 1 and finite dfn, dfd > 0."""
    if _open_unit(q) and _positive(dfn, dfd):
        # scipy.stats.f defines no _isf: the generic one inverts the cdf at 1 − q, so a q below ~1e-16 gives inf.
        return float(special.fdtri(dfn, dfd, 1.0 - q))
    return float(stats.f.isf(q, dfn, dfd))


def nct_cdf(x: float, df: float, nc: float) -> float:
    """stats.nct.cdf(x, df, nc): special.nctdtr(df, nc, x) for finite x, nc and a finite df > 0."""
    if _finite(x, nc) and _positive(df):
        return float(special.nctdtr(df, nc, x))
    return float(stats.nct.cdf(x, df, nc))


def nct_sf(x: float, df: float, nc: float) -> float:
    """stats.nct.sf(x, df, nc): the Boost sf nct._sf calls (scipy.special._ufuncs._nct_sf), for finite x, nc,
    df > 0."""
    if _finite(x, nc) and _positive(df):
        with np.errstate(over="ignore"):
            return float(np.clip(special._nct_sf(x, df, nc), 0, 1))
    return float(stats.nct.sf(x, df, nc))


# Ranks


def ranks_and_ties(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """scipy's private _rankdata(values, "average", return_ties=True) of a non-empty 1-d float array."""
    # The tie counts: each run of equal values has its size at its first position in sorted order, 0 at the others
    # (a NaN is a run of its own). The tie corrections sum over this whole array, as scipy's do, in the same order.
    n = values.size
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    run_starts = np.concatenate(([True], ordered[:-1] != ordered[1:]))
    run_lengths = np.diff(np.flatnonzero(run_starts), append=n)
    run_ranks = np.arange(1, n + 1, dtype=float)[run_starts] + (run_lengths.astype(float) - 1) / 2
    ranks = np.empty(n)
    ranks[order] = np.repeat(run_ranks, run_lengths)
    ties = np.zeros(n)
    ties[run_starts] = run_lengths
    return ranks, ties


def rankdata(values: ArrayLike) -> np.ndarray:
    """stats.rankdata(values) (method 'average') of a non-empty 1-d array of finite values."""
    x = _sample(values)
    if x is None:
        return stats.rankdata(values)
    return ranks_and_ties(x)[0]


# Rank tests


def mannwhitneyu(a: ArrayLike, b: ArrayLike) -> Result:
    """stats.mannwhitneyu(a, b, alternative="two-sided") where scipy approximates (n1, n2 > 8, or ties): U1, p."""
    x, y = _sample(a), _sample(b)
    if x is None or y is None:
        return _delegated(stats.mannwhitneyu(a, b, alternative="two-sided"))
    n1, n2 = x.size, y.size
    ranks, ties = ranks_and_ties(np.concatenate((x, y)))
    if not (n1 > MANNWHITNEYU_EXACT_MAX_N and n2 > MANNWHITNEYU_EXACT_MAX_N) and not np.any(ties > 1):
        return _delegated(stats.mannwhitneyu(a, b, alternative="two-sided"))
    u1 = np.sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u = np.maximum(u1, n1 * n2 - u1)
    n = n1 + n2
    tie_term = np.sum(ties**3 - ties)
    s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - n1 * n2 / 2 - 0.5) / s
    return Result(float(u1), float(np.clip(2 * special.ndtr(-z), 0.0, 1.0)))


def _wilcoxon_is_asymptotic(n: int, has_ties: bool, has_zeros: bool) -> bool:
    if n > WILCOXON_EXACT_MAX_N:
        return True
    return n > WILCOXON_PERMUTATION_MAX_N and (has_ties or has_zeros)


def wilcoxon(d: ArrayLike) -> Result:
    """stats.wilcoxon(d) where scipy approximates (n > 50, or n > 13 with ties or zeros): min(R+, R−), p."""
    x = _sample(d)
    if x is None or not np.any(x):
        return _delegated(stats.wilcoxon(d))
    is_zero = x == 0
    nonzero = np.where(is_zero, np.nan, x)
    count = float(x.size - np.count_nonzero(is_zero))
    ranks, ties = ranks_and_ties(np.abs(nonzero))
    if not _wilcoxon_is_asymptotic(x.size, bool(np.any(ties == 0)), bool(np.any(is_zero))):
        return _delegated(stats.wilcoxon(d))
    r_plus = np.sum((nonzero > 0).astype(float) * ranks)
    r_minus = np.sum((nonzero < 0).astype(float) * ranks)
    mean = count * (count + 1.0) * 0.25
    se = np.sqrt((count * (count + 1.0) * (2.0 * count + 1.0) - np.sum(ties**3 - ties) / 2) / 24)
    z = (r_plus - mean) / se
    return Result(float(min(r_plus, r_minus)), float(2 * special.ndtr(-abs(z))))


def kruskal(*groups: ArrayLike) -> Result:
    """stats.kruskal(*groups) (≥ 2 non-empty groups, not all values equal): tie-corrected H, p from chdtrc."""
    arrays = _samples(groups)
    if arrays is None:
        return _delegated(stats.kruskal(*groups))
    sizes = [a.size for a in arrays]
    total = sum(sizes)
    ranks, ties = ranks_and_ties(np.concatenate(arrays))
    tie_factor = 1 - np.sum(ties**3 - ties) / (total**3 - total)
    if tie_factor == 0:  # every value equal: scipy's H is 0/0
        return _delegated(stats.kruskal(*groups))
    ends = list(itertools.accumulate(sizes))
    between = sum(np.sum(ranks[end - size : end]) ** 2 / size for end, size in zip(ends, sizes, strict=True))
    h = (12.0 / (total * (total + 1)) * between - 3 * (total + 1)) / tie_factor
    return Result(float(h), float(special.chdtrc(float(len(arrays) - 1), h)))


def levene_median(*samples: ArrayLike) -> Result:
    """stats.levene(*samples, center="median") (≥ 2 non-empty samples, not all constant): W, p from fdtrc."""
    arrays = _samples(samples)
    if arrays is None:
        return _delegated(stats.levene(*samples, center="median"))
    sizes = [a.size for a in arrays]
    total = sum(sizes)
    deviations = [np.abs(a - np.median(a)) for a in arrays]
    group_means = [np.mean(z) for z in deviations]
    grand_mean = sum(n * m for n, m in zip(sizes, group_means, strict=True)) / total
    dfd = total - len(arrays)
    dfn = len(arrays) - 1.0
    # np.square as scipy's `** 2` of 1-element arrays: a scalar's `** 2` calls pow, which may round differently.
    numerator = dfd * sum(n * np.square(m - grand_mean) for n, m in zip(sizes, group_means, strict=True))
    denominator = dfn * sum(np.sum((z - m) ** 2) for z, m in zip(deviations, group_means, strict=True))
    if denominator == 0:  # every sample constant: scipy's W is 0/0
        return _delegated(stats.levene(*samples, center="median"))
    w = numerator / denominator
    return Result(float(w), float(special.fdtrc(dfn, float(dfd), w)))


# Correlations


def _paired(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Two 1-d float arrays of one length ≥ 3, neither constant, or None (scipy's own handling is needed)."""
    a, b = _sample(x), _sample(y)
    if a is None or b is None or a.size != b.size or a.size < 3:
        return None
    if np.all(a == a[0]) or np.all(b == b[0]):
        return None
    return a, b


def spearmanr(x: ArrayLike, y: ArrayLike) -> Result:
    """stats.spearmanr(x, y) for ≥ 3 pairs, neither sample constant: rho, and p from stdtr (0 where |rho| = 1)."""
    pair = _paired(x, y)
    if pair is None:
        return _delegated(stats.spearmanr(x, y))
    a, b = pair
    ranks = np.column_stack((ranks_and_ties(a)[0], ranks_and_ties(b)[0]))
    rho = np.corrcoef(ranks, rowvar=False)[1, 0]
    dof = a.size - 2
    with np.errstate(divide="ignore"):
        t = rho * np.sqrt((dof / ((rho + 1.0) * (1.0 - rho))).clip(0))
    return Result(float(rho), float(2 * special.stdtr(dof, -abs(t))))


def _centred_unit(values: np.ndarray) -> tuple[np.ndarray, bool]:
    """`values` centred and scaled to unit norm as scipy.stats.pearsonr does, and whether they are nearly constant
    (where scipy warns that r may be inaccurate)."""
    mean = np.mean(values)
    centred = values - mean
    largest = np.max(np.abs(centred))
    norm = largest * np.linalg.norm(centred / largest, axis=-1)  # with an axis, a pairwise sum (no BLAS dot)
    return centred / norm, bool(norm < np.finfo(float).eps ** 0.75 * abs(mean))


def pearsonr(x: ArrayLike, y: ArrayLike) -> Result:
    """stats.pearsonr(x, y) for ≥ 3 pairs, neither sample (nearly) constant: r, p from the beta on [−1, 1]."""
    pair = _paired(x, y)
    if pair is None:
        return _delegated(stats.pearsonr(x, y))
    (x_unit, x_near_constant), (y_unit, y_near_constant) = _centred_unit(pair[0]), _centred_unit(pair[1])
    if x_near_constant or y_near_constant:
        return _delegated(stats.pearsonr(x, y))
    r = np.clip(x_unit @ y_unit, -1.0, 1.0)
    ab = x_unit.size / 2 - 1
    return Result(float(r), float(2 * special.betaincc(ab, ab, (abs(r) + 1) / 2)))


# Contingency tables


class _Hypergeometric:
    """scipy.stats.hypergeom(total, good, draws) as fisher_exact uses it: Boost's pmf, cdf and sf (the
    scipy.special._ufuncs routines hypergeom._pmf, _cdf and _sf call), with rv_discrete's support handling."""

    def __init__(self, total: int, good: int, draws: int) -> None:
        self.args = (float(good), float(draws), float(total))
        self.low = max(draws - (total - good), 0)
        self.high = min(good, draws)

    def pmf(self, k: int) -> float:
        if self.low <= k <= self.high:
            return float(np.clip(special._hypergeom_pmf(float(k), *self.args), 0, 1))
        return 0.0

    def cdf(self, k: int) -> float:
        if k >= self.high:
            return 1.0
        if k >= self.low:
            return float(np.clip(special._hypergeom_cdf(float(k), *self.args), 0, 1))
        return 0.0

    def sf(self, k: int) -> float:
        if k < self.low:
            return 1.0
        if k < self.high:
            return float(np.clip(special._hypergeom_sf(float(k), *self.args), 0, 1))
        return 0.0


def _binary_search(f: Callable[[int], float], target: float, lo: int, hi: int) -> int:
    """scipy's _binary_search_for_binom_tst: the i in [lo, hi] with f(i) <= target < f(i + 1), f ascending."""
    while lo < hi:
        mid = lo + (hi - lo) // 2
        value = f(mid)
        if value < target:
            lo = mid + 1
        elif value > target:
            hi = mid - 1
        else:
            return mid
    return lo if f(lo) <= target else lo - 1


def _fisher_two_sided_p(c00: int, row0: int, row1: int, col0: int) -> float:
    dist = _Hypergeometric(row0 + row1, row0, col0)
    mode = int((col0 + 1) * (row0 + 1) / (row0 + row1 + 2))
    p_exact, p_mode = dist.pmf(c00), dist.pmf(mode)
    threshold = p_exact * (1 + FISHER_EPSILON)
    if abs(p_exact - p_mode) / max(p_exact, p_mode) <= FISHER_EPSILON:
        return 1.0
    if c00 < mode:
        p_lower = dist.cdf(c00)
        if dist.pmf(col0) > threshold:
            return p_lower
        other_side = _binary_search(lambda k: -dist.pmf(k), -threshold, mode, col0)
        return min(p_lower + dist.sf(other_side), 1.0)
    p_upper = dist.sf(c00 - 1)
    if dist.pmf(0) > threshold:
        return p_upper
    other_side = _binary_search(dist.pmf, threshold, 0, mode)
    return min(p_upper + dist.cdf(other_side), 1.0)


def fisher_exact_2x2(table: ArrayLike) -> Result:
    """stats.fisher_exact(table) for a 2×2 table of counts: odds ratio and two-sided p, with scipy's own search."""
    counts = np.asarray(table)
    if (not reproduces_scipy() or counts.shape != (2, 2) or not np.all(np.isfinite(counts)) or np.any(counts < 0)
            or np.any(counts % 1)):
        return _delegated(stats.fisher_exact(table))
    (c00, c01), (c10, c11) = counts.astype(int).tolist()
    if 0 in (c00 + c01, c10 + c11, c00 + c10, c01 + c11):
        return Result(math.nan, 1.0)  # scipy's answer when a row or column is empty
    odds_ratio = c00 * c11 / (c10 * c01) if c10 > 0 and c01 > 0 else math.inf
    return Result(odds_ratio, _fisher_two_sided_p(c00, c00 + c01, c10 + c11, c00 + c10))


def _expected_frequencies(observed: np.ndarray) -> np.ndarray:
    """scipy.stats.contingency.expected_freq of a 2-d float table: row sum × column sum / total."""
    return np.sum(observed, axis=1, keepdims=True) * np.sum(observed, axis=0, keepdims=True) / observed.sum()


def chi2_contingency(table: ArrayLike) -> ContingencyResult:
    """stats.chi2_contingency(table) for a 2-d table of counts: chi-squared (Yates' when dof == 1), p, dof."""
    observed = np.asarray(table, dtype=float)
    expected = _expected_frequencies(observed) if observed.ndim == 2 and observed.size else None
    if (not reproduces_scipy() or expected is None or not np.all(np.isfinite(observed)) or np.any(observed < 0)
            or np.any(expected == 0)):
        result = stats.chi2_contingency(table)
        return ContingencyResult(float(result.statistic), float(result.pvalue), int(result.dof))
    dof = expected.size - sum(expected.shape) + expected.ndim - 1
    if dof == 0:
        return ContingencyResult(0.0, 1.0, 0)  # scipy's answer for a single row or column
    if dof == 1:
        difference = expected - observed
        observed = observed + np.minimum(0.5, np.abs(difference)) * np.sign(difference)
    statistic = np.sum((observed - expected) ** 2 / expected)
    return ContingencyResult(float(statistic), float(special.chdtrc(float(dof), statistic)), dof)
