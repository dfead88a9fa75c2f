"""The comparison's statistics against scipy and statsmodels on fixed data sets, edge cases included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.meta_analysis import effectsize_smd
from statsmodels.stats.power import TTestIndPower, TTestPower

from consumers.report import stats as st

SN = [0.951, 0.962, 0.948, 0.970, 0.955, 0.958, 0.949, 0.966]
BASE = [0.944, 0.950, 0.939, 0.958, 0.947, 0.941, 0.952]
TIES_A = [0.9, 0.9, 0.92, 0.92, 0.92, 0.95]
TIES_B = [0.9, 0.91, 0.92, 0.92, 0.93]
DATA_SETS = [(SN, BASE), (TIES_A, TIES_B), (BASE, SN), ([0.5, 0.7], [0.4, 0.45, 0.9])]
close = pytest.approx


@pytest.mark.parametrize("values", [SN, TIES_A, [0.3, 0.3], [0.1, 0.5, 0.2]])
def test_summary_matches_numpy_and_scipy(values):
    s = st.summarize(values)
    ci = stats.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (s.n, s.mean, s.median, s.std, s.min, s.max) == (
        len(values), close(np.mean(values)), close(np.median(values)), close(np.std(values, ddof=1)),
        min(values), max(values))
    assert (s.ci_low, s.ci_high) == (close(ci.low), close(ci.high))


def test_summary_edge_cases():
    assert st.summarize([]) == st.Summary(0)
    assert st.summarize([0.9]) == st.Summary(1, 0.9, 0.9, None, None, None, 0.9, 0.9)
    same = st.summarize([0.8] * 5)
    assert (same.std, same.ci_low, same.ci_high) == (0, close(0.8), close(0.8))


@pytest.mark.parametrize("values", [SN, TIES_A, [0.8] * 4, [0.7], []])
def test_sufficient_statistics_give_the_same_summary(values):
    direct = st.summarize(values)
    x = np.asarray(values, dtype=float)
    from_sums = st.summarize_sufficient(len(x), float(x.sum()), float((x * x).sum()), direct.min, direct.max,
                                       direct.median)
    for field in ("n", "mean", "median", "std", "ci_low", "ci_high", "min", "max"):
        expected = getattr(direct, field)
        assert getattr(from_sums, field) == (None if expected is None else close(expected, abs=1e-9)), field


@pytest.mark.parametrize(("a", "b"), DATA_SETS)
def test_welch_matches_scipy(a, b):
    ref = stats.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    diff, test = st.welch_difference(a, b), st.welch_test(a, b)
    assert diff.estimate == close(np.mean(a) - np.mean(b))
    assert (diff.ci_low, diff.ci_high, diff.df) == (close(ci.low), close(ci.high), close(ref.df))
    assert (test.statistic, test.p_value) == (close(ref.statistic), close(ref.pvalue))


def test_welch_edge_cases():
    assert st.welch_test([], BASE) == st.TestResult()
    assert st.welch_difference([0.9], BASE).estimate == close(0.9 - np.mean(BASE))
    assert st.welch_difference([0.9], BASE).ci_low is None
    assert st.welch_test([0.9], BASE) == st.TestResult()
    zero = st.welch_difference([0.9, 0.9], [0.8, 0.8, 0.8])
    assert (zero.estimate, zero.se, zero.ci_low) == (close(0.1), 0.0, None)
    assert st.welch_test([0.9, 0.9], [0.8, 0.8, 0.8]).p_value is None
    # One arm constant, the other not: still a valid Welch test.
    ref = stats.ttest_ind([0.9, 0.9, 0.9], BASE, equal_var=False)
    assert st.welch_test([0.9, 0.9, 0.9], BASE).p_value == close(ref.pvalue)


@pytest.mark.parametrize(("a", "b"), [*DATA_SETS, ([0.9] * 3, [0.9] * 2), ([0.9], [0.8])])
def test_mann_whitney_matches_scipy_including_ties(a, b):
    ref = stats.mannwhitneyu(a, b, alternative="two-sided")
    got = st.mann_whitney(a, b)
    assert (got.statistic, got.p_value) == (close(ref.statistic), close(ref.pvalue))


def test_mann_whitney_empty_arm():
    assert st.mann_whitney([], BASE) == st.TestResult()


PAIRS = ([0.95, 0.96, 0.94, 0.97, 0.93, 0.955], [0.94, 0.955, 0.945, 0.96, 0.925, 0.95])
PAIRS_TIES = ([0.9, 0.92, 0.92, 0.95, 0.91], [0.89, 0.91, 0.91, 0.95, 0.92])


@pytest.mark.parametrize(("a", "b"), [PAIRS, PAIRS_TIES])
def test_paired_matches_scipy(a, b):
    got = st.paired(a, b)
    ref = stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    wilcoxon = stats.wilcoxon(a, b)
    assert got.n_pairs == len(a)
    assert (got.t_test.statistic, got.t_test.p_value, got.t_test.df) == (
        close(ref.statistic), close(ref.pvalue), len(a) - 1)
    assert (got.difference.ci_low, got.difference.ci_high) == (close(ci.low), close(ci.high))
    assert (got.wilcoxon.statistic, got.wilcoxon.p_value) == (close(wilcoxon.statistic), close(wilcoxon.pvalue))


def test_paired_edge_cases():
    assert st.paired([], []).n_pairs == 0
    one = st.paired([0.9], [0.8])
    assert (one.n_pairs, one.difference.estimate, one.t_test.p_value) == (1, close(0.1), None)
    identical = st.paired([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])
    assert (identical.t_test.p_value, identical.wilcoxon.p_value) == (None, 1.0)
    shifted = st.paired([0.9, 0.8, 0.7], [0.8, 0.7, 0.6])  # constant difference: no t-test, Wilcoxon still works
    assert shifted.t_test.p_value is None
    assert shifted.wilcoxon.p_value == close(stats.wilcoxon([0.1, 0.1, 0.1]).pvalue)


@pytest.mark.parametrize(("a", "b"), DATA_SETS)
def test_hedges_g_matches_statsmodels(a, b):
    expected, _ = effectsize_smd(np.mean(a), np.std(a, ddof=1), len(a), np.mean(b), np.std(b, ddof=1), len(b))
    assert st.hedges_g(a, b) == close(expected)


def test_hedges_g_edge_cases():
    assert st.hedges_g([0.9], BASE) is None
    assert st.hedges_g([0.9, 0.9], [0.8, 0.8]) is None


@pytest.mark.parametrize(("a", "b"), [*DATA_SETS, ([0.9] * 3, [0.9] * 2), ([0.9], [0.8])])
def test_cliffs_delta_matches_brute_force_and_mann_whitney(a, b):
    brute = np.sign(np.subtract.outer(a, b)).mean()
    u = stats.mannwhitneyu(a, b, alternative="two-sided").statistic
    assert st.cliffs_delta(a, b) == close(brute)
    assert st.cliffs_delta(a, b) == close(2 * u / (len(a) * len(b)) - 1)
    assert st.cliffs_delta([], b) is None


def test_rates_use_fisher_exact():
    got = st.compare_rates(6, 20, 1, 22)
    assert (got.rate_a, got.rate_b) == (0.3, close(1 / 22))
    assert got.p_value == close(stats.fisher_exact([[6, 14], [1, 21]]).pvalue)
    assert st.compare_rates(0, 0, 1, 3) == st.RateComparison(None, 1 / 3, None)


def test_distribution_comparisons():
    rng = np.random.default_rng(1)
    a, b = list(rng.uniform(0, 1, 40)), list(rng.uniform(0.3, 1.3, 35))
    ks = st.compare_distributions(a, b)
    ref = stats.ks_2samp(a, b)
    assert (ks.test, ks.statistic, ks.p_value) == ("ks", close(ref.statistic), close(ref.pvalue))
    cat_a, cat_b = [64, 128, 256, 64, 64, 128], [256, 256, 128, 256, 64]
    chi = st.compare_distributions(cat_a, cat_b)
    ref = stats.chi2_contingency([[3, 2, 1], [1, 1, 3]])
    assert (chi.test, chi.statistic, chi.p_value) == ("chi2", close(ref.statistic), close(ref.pvalue))
    two = st.compare_distributions(["adam", "sgd", "adam"], ["sgd", "sgd"])
    assert (two.test, two.p_value) == ("fisher", close(stats.fisher_exact([[2, 1], [0, 2]]).pvalue))
    assert st.compare_distributions([1, 1, 1], [1, 1]) is None  # never varies
    assert st.compare_distributions([0.1], [0.2, 0.3]) is None


@pytest.mark.parametrize(("effect", "n_a", "n_b"), [(0.5, 20, 20), (0.2, 30, 51), (1.1, 5, 9), (-0.4, 12, 12)])
def test_power_independent_matches_statsmodels(effect, n_a, n_b):
    expected = TTestIndPower().power(effect_size=effect, nobs1=n_a, alpha=0.05, ratio=n_b / n_a)
    assert st.power_independent(effect, n_a, n_b) == close(expected)


@pytest.mark.parametrize(("effect", "n"), [(0.5, 20), (0.2, 64), (-1.3, 4)])
def test_power_paired_matches_statsmodels(effect, n):
    assert st.power_paired(effect, n) == close(TTestPower().power(effect_size=effect, nobs=n, alpha=0.05))


@pytest.mark.parametrize("effect", [0.05, 0.2, 0.5, 0.8, 1.5, 3.0, -0.35])
def test_required_sizes_match_statsmodels(effect):
    per_arm = TTestIndPower().solve_power(effect_size=abs(effect), alpha=0.05, power=0.8)
    pairs = TTestPower().solve_power(effect_size=abs(effect), alpha=0.05, power=0.8)
    assert st.required_per_arm(effect) == max(2, math.ceil(per_arm))
    assert st.required_pairs(effect) == max(2, math.ceil(pairs))
    n = st.required_per_arm(effect)
    assert st.power_independent(effect, n, n) >= 0.8 > (st.power_independent(effect, n - 1, n - 1) or 0)


def test_required_sizes_edge_cases():
    assert st.required_per_arm(0.0) is None
    assert st.required_pairs(0.0) is None
    assert st.required_per_arm(1e-9) is None  # beyond MAX_N
    assert st.power_independent(0.5, 1, 10) is None
    assert st.power_paired(0.5, 1) is None


def test_integer_and_float_spellings_of_a_value_are_one_category():
    from consumers.report.stats import compare_distributions

    same = compare_distributions([1, 2, 1, 2], [1.0, 2.0, 1.0, 2.0])
    assert same is not None and same.test == "fisher" and same.p_value == 1.0


def test_t_quantile_and_tail_are_scipy_t_bit_for_bit():
    rng = np.random.default_rng(5)
    qs = [*rng.uniform(0, 1, 200), 0.975, 0.5, 1e-300, 1 - 1e-16, 0.0, 1.0, -0.1, float("nan")]
    xs = [*rng.normal(0, 5, 200), 0.0, -0.0, 40.0, -40.0, float("inf"), -float("inf"), float("nan")]
    dfs = [1, 2, 3.5, 29, 41999, 0.5, 1e9, float("inf"), 0, -1]
    for df in dfs:
        for q in qs:
            np.testing.assert_array_equal(st.t_ppf(q, df), stats.t.ppf(q, df))
        for x in xs:
            np.testing.assert_array_equal(st.t_sf(x, df), stats.t.sf(x, df))
