"""TOST, ASO and the Bayesian signed-rank test against statsmodels, deepsig and baycomp on fixed data."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.weightstats import ttost_ind, ttost_paired

from consumers.report import equivalence as eq

RNG = np.random.default_rng(11)
SN = list(0.95 + RNG.normal(0, 0.01, 30))
BASE = list(0.945 + RNG.normal(0, 0.012, 30))
SHIFTED = list(np.asarray(BASE) + 0.03 + RNG.normal(0, 0.004, 30))
close = pytest.approx


@pytest.mark.parametrize("margin", [0.002, 0.01, 0.03])
@pytest.mark.parametrize(("a", "b"), [(SN, BASE), (BASE, SN), (SHIFTED, BASE)])
def test_tost_matches_statsmodels(a, b, margin):
    p, lower, upper = ttost_paired(np.asarray(a), np.asarray(b), -margin, margin)
    mine = eq.tost_paired(a, b, margin)
    assert (mine.p_value, mine.p_lower, mine.p_upper) == (close(p), close(lower[1]), close(upper[1]))
    p, lower, upper = ttost_ind(np.asarray(a), np.asarray(b[:25]), -margin, margin, usevar="unequal")
    mine = eq.tost_welch(a, b[:25], margin)
    assert (mine.p_value, mine.p_lower, mine.p_upper) == (close(p), close(lower[1]), close(upper[1]))


def test_tost_edge_cases():
    assert eq.tost_paired([0.9], [0.8], 0.01).p_value is None
    assert eq.tost_welch([0.9, 0.9], [0.9, 0.9], 0.01).p_value == 0.0  # identical, no spread: inside the margin
    assert eq.tost_welch([0.9, 0.9], [0.8, 0.8], 0.01).p_value == 1.0


@pytest.mark.parametrize(("a", "b"), [(SN, BASE), (BASE, SN), (SHIFTED, BASE), (SN[:5], BASE[:9])])
def test_violation_ratio_equals_deepsig(a, b):
    from deepsig.aso import compute_violation_ratio

    t = eq._grid(eq.ASO_DT)
    xa, xb = np.sort(a), np.sort(b)
    mine = eq.violation_ratio(xa[eq._order_indices(len(xa), t) - 1], xb[eq._order_indices(len(xb), t) - 1])
    assert float(mine) == close(compute_violation_ratio(np.asarray(a), np.asarray(b), dt=eq.ASO_DT))


@pytest.mark.parametrize(("a", "b"), [(SN, BASE), (BASE, SN), (SHIFTED, BASE)])
def test_aso_epsilon_min_agrees_with_deepsig(a, b):
    """The bootstrap differs in its random draws (deepsig resamples n values, we draw the order statistics
    directly), so ε_min agrees within Monte Carlo error, not to the digit."""
    from deepsig import aso

    reference = aso(np.asarray(a), np.asarray(b), seed=3, show_progress=False, num_bootstrap_iterations=1000)
    assert eq.aso(a, b, seed=3).epsilon_min == close(reference, abs=0.03)


def test_bootstrapped_order_statistics_have_the_resampling_distribution():
    """The gamma-spacing draw of the quantile curve equals, in distribution, sorting n values resampled with
    replacement: compare the mean and spread of one grid quantile over many draws."""
    x = np.sort(np.asarray(SN))
    t = eq._grid(eq.ASO_DT)
    fast = eq._bootstrap_quantiles(x, t, 20_000, np.random.default_rng(1))
    rng = np.random.default_rng(2)
    slow = np.sort(rng.choice(x, size=(20_000, len(x))), axis=1)[:, eq._order_indices(len(x), t) - 1]
    for column in (10, 99, 180):
        assert fast[:, column].mean() == close(slow[:, column].mean(), abs=2e-4)
        assert fast[:, column].std() == close(slow[:, column].std(), rel=0.05)


@pytest.mark.parametrize("rope", [0.002, 0.01])
@pytest.mark.parametrize(("a", "b"), [(SN, BASE), (SHIFTED, BASE), (SN[:8], SN[1:9])])
def test_bayes_signed_rank_agrees_with_baycomp(a, b, rope):
    from baycomp import SignedRankTest

    reference = SignedRankTest.probs(np.asarray(a), np.asarray(b), rope, nsamples=50_000, random_state=4)
    mine = eq.bayes_signed_rank(a, b, rope, seed=4)
    assert (mine.p_a_better, mine.p_equivalent, mine.p_b_better) == (
        close(reference[0], abs=0.01), close(reference[1], abs=0.01), close(reference[2], abs=0.01))


def test_bayes_signed_rank_with_ties_on_the_rope_edge():
    """d_i + d_j exactly 2·rope counts half, as baycomp's heaviside does."""
    from baycomp import SignedRankTest

    a, b = [0.5, 0.75, 0.5, 1.0], [0.25, 0.5, 0.5, 0.5]
    reference = SignedRankTest.probs(np.asarray(a), np.asarray(b), 0.25, nsamples=50_000, random_state=1)
    mine = eq.bayes_signed_rank(a, b, 0.25, seed=1)
    assert mine.p_a_better == close(reference[0], abs=0.01) and mine.p_b_better == close(reference[2], abs=0.01)
