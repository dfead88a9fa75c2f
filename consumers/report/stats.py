"""Pure statistics of the spectral-norm (a) vs baseline (b) comparison: no I/O, plain floats in and out.

Conventions: differences are a − b (SN minus baseline); every function returns None (or a result whose fields are
None) where the figure is undefined — an empty arm, a single value, zero variance — instead of NaN or an error,
so callers can print "not enough trials" rather than a number that means nothing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consumers.report import special_stats as ss
from consumers.report.lazy_stats import special, stats

ALPHA = 0.05
TARGET_POWER = 0.8
CONFIDENCE = 0.95
# A hyper-parameter with more distinct numeric values than this is compared as a continuous distribution (KS).
MAX_CATEGORIES = 10
MAX_N = 10**9


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float | None = None
    median: float | None = None
    std: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    min: float | None = None
    max: float | None = None


def variance(values) -> float:
    """Sample variance (ddof 1) of ≥ 2 values; exactly 0 when they are equal up to float rounding (e.g. 0.9 − 0.8
    and 0.8 − 0.7), so "no spread" is recognised instead of producing a t statistic of 1e15."""
    x = np.asarray(values, dtype=float)
    if np.ptp(x) <= 1e-12 * max(1.0, float(np.max(np.abs(x)))):
        return 0.0
    return float(np.var(x, ddof=1))


def t_ppf(q: float, df: float) -> float:
    """scipy.stats.t.ppf(q, df): for 0 < q < 1 and a finite df > 0, the scipy.special.stdtrit(df, q) it computes,
    without its argument handling (most of a call's time; the strata and curves make hundreds of calls)."""
    if 0 < q < 1 and 0 < df < math.inf:
        return float(special.stdtrit(df, q))
    return float(stats.t.ppf(q, df))


def t_sf(x: float, df: float) -> float:
    """scipy.stats.t.sf(x, df): for a finite x and a finite df > 0, the scipy.special.stdtr(df, -x) it computes."""
    if math.isfinite(x) and 0 < df < math.inf:
        return float(special.stdtr(df, -x))
    return float(stats.t.sf(x, df))


def t_interval(n: int, mean: float | None, std: float | None, confidence: float = CONFIDENCE):
    """The t-based confidence interval of a mean: (low, high), or (None, None) when n < 2."""
    if n < 2 or mean is None or std is None:
        return None, None
    half = t_ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def summarize(values: Sequence[float]) -> Summary:
    """n, mean, median, sample std (ddof 1), 95% t-interval of the mean, min and max."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return Summary(0)
    mean = float(x.mean())
    std = math.sqrt(variance(x)) if n > 1 else None
    low, high = t_interval(n, mean, std)
    return Summary(n, mean, float(np.median(x)), std, low, high, float(x.min()), float(x.max()))


def summarize_sufficient(n: int, total: float, total_sq: float, minimum: float | None, maximum: float | None,
                         median: float | None = None) -> Summary:
    """The same Summary from sufficient statistics (count, sum, sum of squares, min, max); the median cannot be
    derived from them and is passed in when known."""
    if n == 0:
        return Summary(0)
    mean = total / n
    std = None
    if n > 1:
        # Identical values have no spread, whatever rounding the sums picked up.
        variance = 0.0 if minimum == maximum else max(0.0, (total_sq - total * total / n) / (n - 1))
        std = math.sqrt(variance)
    low, high = t_interval(n, mean, std)
    return Summary(n, mean, median, std, low, high, minimum, maximum)


@dataclass(frozen=True)
class Difference:
    """a − b with its standard error, degrees of freedom and 95% confidence interval."""

    estimate: float | None = None
    se: float | None = None
    df: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None


@dataclass(frozen=True)
class TestResult:
    statistic: float | None = None
    p_value: float | None = None
    df: float | None = None


def _interval(estimate: float, se: float, df: float) -> Difference:
    half = t_ppf((1 + CONFIDENCE) / 2, df) * se
    return Difference(estimate, se, df, estimate - half, estimate + half)


def welch_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Difference of means with the Welch–Satterthwaite interval (no equal-variance assumption)."""
    if len(a) == 0 or len(b) == 0:
        return Difference()
    estimate = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Difference(estimate)
    va, vb = variance(a) / len(a), variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(estimate, 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return _interval(estimate, se, float(df))


def welch_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's two-sided t-test; undefined for an arm under 2 values or when both arms have zero variance."""
    diff = welch_difference(a, b)
    if not diff.se:
        return TestResult()
    t = diff.estimate / diff.se
    return TestResult(t, 2 * t_sf(abs(t), diff.df), diff.df)


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Mann–Whitney U of a (two-sided; exact for small samples without ties, tie-corrected normal otherwise)."""
    if len(a) == 0 or len(b) == 0:
        return TestResult()
    result = ss.mannwhitneyu(a, b)
    return TestResult(float(result.statistic), float(result.pvalue))


def mean_difference(d: Sequence[float]) -> Difference:
    """The mean of differences d with its t-interval (se 0 and no interval when they do not vary)."""
    d = np.asarray(d, dtype=float)
    if len(d) == 0:
        return Difference()
    mean = float(d.mean())
    if len(d) < 2:
        return Difference(mean)
    se = math.sqrt(variance(d) / len(d))
    return Difference(mean, 0.0) if se == 0 else _interval(mean, se, len(d) - 1)


@dataclass(frozen=True)
class PairedResult:
    n_pairs: int
    difference: Difference
    t_test: TestResult
    wilcoxon: TestResult


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[Difference, TestResult]:
    """The mean difference of pairs (a[i], b[i]) with its interval, and the paired t-test (what `paired` gives
    without the signed-rank test)."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    difference = mean_difference(d)
    if len(d) < 2 or not difference.se:
        return difference, TestResult()
    t = difference.estimate / difference.se
    return difference, TestResult(t, 2 * t_sf(abs(t), len(d) - 1), float(len(d) - 1))


def paired(a: Sequence[float], b: Sequence[float]) -> PairedResult:
    """Paired t-test and Wilcoxon signed-rank over pairs (a[i], b[i]); the interval is of the mean difference."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n == 0:
        return PairedResult(0, Difference(), TestResult(), TestResult())
    difference, t_test = paired_t(a, b)
    if n < 2:
        return PairedResult(1, difference, TestResult(), TestResult())
    if np.all(d == 0):
        wilcoxon = TestResult(0.0, 1.0)
    else:
        w = ss.wilcoxon(d)
        wilcoxon = TestResult(float(w.statistic), float(w.pvalue))
    return PairedResult(n, difference, t_test, wilcoxon)


def pooled_std(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    pooled = ((len(a) - 1) * variance(a) + (len(b) - 1) * variance(b)) / (len(a) + len(b) - 2)
    return float(math.sqrt(pooled))


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Standardized mean difference with the small-sample correction J = 1 − 3 / (4(n_a + n_b) − 9)."""
    s = pooled_std(a, b)
    if not s:
        return None
    correction = 1 - 3 / (4 * (len(a) + len(b)) - 9)
    return correction * float(np.mean(a) - np.mean(b)) / s


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float | None:
    """P(a > b) − P(a < b) over all cross pairs, from mid-ranks (ties count as half), O(n log n)."""
    na, nb = len(a), len(b)
    if na == 0 or nb == 0:
        return None
    ranks = ss.rankdata(np.concatenate([np.asarray(a, dtype=float), np.asarray(b, dtype=float)]))
    u_a = float(ranks[:na].sum()) - na * (na + 1) / 2
    return 2 * u_a / (na * nb) - 1


@dataclass(frozen=True)
class RateComparison:
    rate_a: float | None
    rate_b: float | None
    p_value: float | None


def compare_rates(k_a: int, n_a: int, k_b: int, n_b: int) -> RateComparison:
    """Proportions k/n per arm and Fisher's exact test of their equality (two-sided)."""
    rate_a = k_a / n_a if n_a else None
    rate_b = k_b / n_b if n_b else None
    if not n_a or not n_b:
        return RateComparison(rate_a, rate_b, None)
    p = ss.fisher_exact_2x2([[k_a, n_a - k_a], [k_b, n_b - k_b]]).pvalue
    return RateComparison(rate_a, rate_b, float(p))


@dataclass(frozen=True)
class DistributionTest:
    test: str  # "ks" (continuous), "fisher" (two categories) or "chi2" (more)
    statistic: float | None
    p_value: float


def is_number(value: object) -> bool:
    """A JSON number (int or float, not bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _category(value: object) -> str:
    """A hyper-parameter value as a category: 1 and 1.0 are one value (JSON does not keep the difference)."""
    return repr(float(value)) if is_number(value) else repr(value)


def compare_distributions(a: Sequence[object], b: Sequence[object]) -> DistributionTest | None:
    """Whether a hyper-parameter is distributed alike in both arms: two-sample Kolmogorov–Smirnov for numbers with
    many distinct values, Fisher's exact (two values) or chi-square (more) on the value counts otherwise.
    None when either arm has fewer than 2 values or the parameter never varies."""
    if len(a) < 2 or len(b) < 2:
        return None
    categories = sorted({_category(v) for v in (*a, *b)})
    if len(categories) < 2:
        return None
    if len(categories) > MAX_CATEGORIES and all(is_number(v) for v in (*a, *b)):
        result = stats.ks_2samp(np.asarray(a, dtype=float), np.asarray(b, dtype=float))
        return DistributionTest("ks", float(result.statistic), float(result.pvalue))
    count_a, count_b = Counter(map(_category, a)), Counter(map(_category, b))
    table = [[count_a[c] for c in categories], [count_b[c] for c in categories]]
    if len(categories) == 2:
        return DistributionTest("fisher", None, float(ss.fisher_exact_2x2(table).pvalue))
    chi2 = ss.chi2_contingency(table)
    return DistributionTest("chi2", float(chi2.statistic), float(chi2.pvalue))


def _two_sided_power(nc: float, df: float, alpha: float) -> float:
    crit = -t_ppf(alpha / 2, df)  # scipy.stats.t.isf
    return ss.nct_sf(crit, df, nc) + ss.nct_cdf(-crit, df, nc)


def power_independent(effect: float, n_a: int, n_b: int, alpha: float = ALPHA) -> float | None:
    """Power of the two-sided two-sample t-test to detect a standardized difference `effect` (Cohen's d)."""
    if n_a < 2 or n_b < 2:
        return None
    return _two_sided_power(effect * math.sqrt(n_a * n_b / (n_a + n_b)), n_a + n_b - 2, alpha)


def power_paired(effect: float, n: int, alpha: float = ALPHA) -> float | None:
    """Power of the two-sided paired t-test to detect a standardized mean difference `effect` (d_z)."""
    if n < 2:
        return None
    return _two_sided_power(effect * math.sqrt(n), n - 1, alpha)


def _smallest_n(power_at, target: float) -> int | None:
    """Smallest n ≥ 2 with power_at(n) ≥ target (power grows with n): doubling, then bisection. None past
    MAX_N (an effect too small to chase)."""
    low, high = 1, 2  # n = 1 has no test: it counts as failing
    while not power_at(high) >= target:
        if high > MAX_N:
            return None
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if power_at(mid) >= target else (mid, high)
    return high


def required_per_arm(effect: float, alpha: float = ALPHA, power: float = TARGET_POWER) -> int | None:
    """Completed trials per arm (equal arms) for `power` to detect `effect` (Cohen's d); None when effect is 0."""
    if not effect or not math.isfinite(effect):
        return None
    return _smallest_n(lambda n: power_independent(effect, n, n, alpha), power)


def required_pairs(effect: float, alpha: float = ALPHA, power: float = TARGET_POWER) -> int | None:
    """Complete pairs for `power` to detect `effect` (d_z) with the paired t-test; None when effect is 0."""
    if not effect or not math.isfinite(effect):
        return None
    return _smallest_n(lambda n: power_paired(effect, n, alpha), power)


@dataclass(frozen=True)
class VarianceRatio:
    """var(a) / var(b) with its F-based 95% interval (normal data), and Brown–Forsythe's test of equal spread
    (Levene's with medians, robust to non-normality)."""

    ratio: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    brown_forsythe: TestResult = TestResult()


def variance_ratio(a: Sequence[float], b: Sequence[float]) -> VarianceRatio:
    if len(a) < 2 or len(b) < 2:
        return VarianceRatio()
    va, vb = variance(a), variance(b)
    bf = TestResult()
    if va or vb:
        result = ss.levene_median(a, b)
        bf = TestResult(float(result.statistic), float(result.pvalue))
    if vb == 0:
        return VarianceRatio(brown_forsythe=bf)
    ratio = va / vb
    dfa, dfb = len(a) - 1, len(b) - 1
    tail = (1 - CONFIDENCE) / 2
    return VarianceRatio(ratio, ratio / ss.f_isf(tail, dfa, dfb), ratio / ss.f_ppf(tail, dfa, dfb), bf)


@dataclass(frozen=True)
class Ratio:
    """The geometric-mean ratio a / b of a positive quantity with its 95% interval (from the t-interval of the mean
    log ratio, so both ends stay positive), over `n` pairs or Welch's over two independent arms."""

    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n: int = 0


def _ratio(difference: Difference, n: int) -> Ratio:
    if difference.estimate is None:
        return Ratio(n=n)
    ends = (None, None) if difference.ci_low is None else (math.exp(difference.ci_low), math.exp(difference.ci_high))
    return Ratio(math.exp(difference.estimate), *ends, n)


def ratio_paired(a: Sequence[float], b: Sequence[float]) -> Ratio:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) != len(y):
        raise ValueError("ratio_paired: a and b must have one value per pair")
    kept = (x > 0) & (y > 0)
    difference, _ = paired_t(np.log(x[kept]), np.log(y[kept]))
    return _ratio(difference, int(kept.sum()))


def ratio_independent(a: Sequence[float], b: Sequence[float]) -> Ratio:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    la, lb = np.log(x[x > 0]), np.log(y[y > 0])
    return _ratio(welch_difference(la, lb), len(la) + len(lb))


def pitman_morgan(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Equal variances of paired values (Pitman–Morgan): var(a) = var(b) exactly when a − b and a + b are
    uncorrelated, so the test is Pearson's r of those two with its t-based p."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(x) < 3 or variance(x - y) == 0 or variance(x + y) == 0:
        return TestResult()
    result = ss.pearsonr(x - y, x + y)
    return TestResult(float(result.statistic), float(result.pvalue), float(len(x) - 2))
