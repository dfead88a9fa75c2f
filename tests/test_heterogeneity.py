"""Holm, Spearman, buckets, the interaction test, inverse-variance pooling and the stability statistics against
scipy and statsmodels on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.meta_analysis import combine_effects
from statsmodels.stats.multitest import multipletests

from consumers.report import heterogeneity as het
from consumers.report import stats as st

RNG = np.random.default_rng(5)
X = RNG.uniform(0, 1, 40)
Y = 0.3 * X + RNG.normal(0, 0.2, 40)
close = pytest.approx


@pytest.mark.parametrize("p", [[0.01, 0.04, 0.03, 0.2], [0.5, 0.001], [0.02, 0.02, 0.9, 0.04, 0.011]])
def test_holm_matches_statsmodels(p):
    assert het.holm(p) == close(list(multipletests(p, method="holm")[1]))


def test_holm_skips_undefined_p_values():
    assert het.holm([0.01, None, 0.04]) == [close(0.02), None, close(0.04)]


def test_spearman_matches_scipy():
    ref = stats.spearmanr(X, Y)
    mine = het.spearman(X, Y)
    assert (mine.statistic, mine.p_value) == (close(ref.statistic), close(ref.pvalue))
    assert het.spearman([1, 2], [3, 4]).p_value is None and het.spearman([1, 1, 1], [1, 2, 3]).p_value is None


def test_buckets_are_quantiles_with_t_intervals():
    buckets = het.paired_buckets(list(X), list(Y))
    assert len(buckets) == 4 and sum(b.n for b in buckets) == 40
    edges = np.quantile(X, [0, 0.25, 0.5, 0.75, 1])
    first = Y[(X >= edges[0]) & (X < edges[1])]
    ci = stats.ttest_1samp(first, 0).confidence_interval(0.95)
    assert (buckets[0].difference.estimate, buckets[0].difference.ci_low, buckets[0].difference.ci_high) == (
        close(first.mean()), close(ci.low), close(ci.high))
    assert buckets[-1].n == int((X >= edges[3]).sum())
    categorical = het.paired_buckets(["a", "b", "a", "b"], [0.1, 0.2, 0.3, 0.4])
    assert [(b.label, b.n, b.difference.estimate) for b in categorical] == [
        ("'a'", 2, close(0.2)), ("'b'", 2, close(0.3))]


def test_interaction_matches_statsmodels_ols():
    arm = RNG.uniform(0, 1, 40) < 0.5
    outcome = 0.9 + 0.02 * arm + 0.05 * arm * X + RNG.normal(0, 0.01, 40)
    design = np.column_stack([np.ones(40), arm, X, arm * X])
    fit = sm.OLS(outcome, design).fit()
    mine = het.interaction(X, arm, outcome)
    assert (mine.statistic, mine.p_value, mine.df) == (close(fit.params[3]), close(fit.pvalues[3]), fit.df_resid)
    assert het.interaction([1.0] * 10, [True, False] * 5, list(range(10))).p_value is None  # x never varies


def test_inverse_variance_pooling_matches_statsmodels():
    effects, ses = [0.01, 0.03, -0.005, 0.02], [0.004, 0.01, 0.006, 0.008]
    ref = combine_effects(np.asarray(effects), np.asarray(ses) ** 2, method_re="chi2")
    mine = het.inverse_variance(effects, ses)
    assert mine.estimate == close(ref.mean_effect_fe) and mine.se == close(ref.sd_eff_w_fe)
    assert (mine.q, mine.i_squared) == (close(ref.q), close(ref.i2))
    fixed = ref.summary_frame(alpha=0.05).loc["fixed effect"]
    assert (mine.ci_low, mine.ci_high) == (close(fixed["ci_low"]), close(fixed["ci_upp"]))
    assert het.inverse_variance([0.01], [0.002]).i_squared is None
    assert het.inverse_variance([], []).estimate is None


@pytest.mark.parametrize(("a", "b"), [(list(X[:20]), list(Y[:25])), ([0.9, 0.91, 0.95, 0.9], [0.8, 0.99, 0.7])])
def test_variance_ratio_and_brown_forsythe_match_scipy(a, b):
    result = st.variance_ratio(a, b)
    ratio = np.var(a, ddof=1) / np.var(b, ddof=1)
    dfa, dfb = len(a) - 1, len(b) - 1
    assert result.ratio == close(ratio)
    assert (result.ci_low, result.ci_high) == (close(ratio / stats.f.ppf(0.975, dfa, dfb)),
                                               close(ratio * stats.f.ppf(0.975, dfb, dfa)))
    ref = stats.levene(a, b, center="median")
    assert (result.brown_forsythe.statistic, result.brown_forsythe.p_value) == (close(ref.statistic),
                                                                                close(ref.pvalue))
    assert st.variance_ratio([0.9], b).ratio is None


def test_duration_ratios_are_geometric_means_with_positive_intervals():
    a, b = [120.0, 90, 300, 80, 95], [100.0, 85, 200, 70, 99]
    result = st.ratio_paired(a, b)
    ref = stats.ttest_rel(np.log(a), np.log(b)).confidence_interval(0.95)
    assert (result.estimate, result.ci_low, result.ci_high, result.n) == (
        close(np.exp(np.mean(np.log(a) - np.log(b)))), close(np.exp(ref.low)), close(np.exp(ref.high)), 5)
    independent = st.ratio_independent(a, b[:4])
    ref = stats.ttest_ind(np.log(a), np.log(b[:4]), equal_var=False).confidence_interval(0.95)
    assert (independent.ci_low, independent.ci_high) == (close(np.exp(ref.low)), close(np.exp(ref.high)))
    assert independent.ci_low > 0


def test_independent_buckets_are_welch_per_bucket():
    arm = np.arange(40) % 2 == 0
    buckets = het.independent_buckets(list(X), list(arm), list(Y))
    mask = X >= np.quantile(X, 0.75)
    ref = stats.ttest_ind(Y[mask & arm], Y[mask & ~arm], equal_var=False).confidence_interval(0.95)
    assert (buckets[-1].difference.ci_low, buckets[-1].difference.ci_high) == (close(ref.low), close(ref.high))


def test_pitman_morgan_is_pearson_of_difference_and_sum():
    a, b = X[:20] * 2, Y[:20]
    ref = stats.pearsonr(a - b, a + b)
    mine = st.pitman_morgan(a, b)
    assert (mine.statistic, mine.p_value) == (close(ref.statistic), close(ref.pvalue))
    assert st.pitman_morgan([0.9, 0.8], [0.7, 0.6]).p_value is None
