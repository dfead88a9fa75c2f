"""consumers.report.special_stats against scipy.stats itself on fixed seeded data: the same numbers to rtol 1e-12 in
the large-sample regimes it computes, scipy's own results where scipy uses an exact or permutation method, and no
scipy.stats import on the large-sample paths."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from scipy.stats._stats_py import _rankdata

from consumers.report import special_stats as ss

# Every value comes from the same formulas as scipy's, in the same order of operations (on this scipy they agree to
# the bit); 1e-12 leaves room for a BLAS or libm that rounds differently. A p-value that is 0 must be exactly 0.
RTOL = 1e-12
SIZES = [3, 9, 51, 60, 500, 40_000]
# Shifts (or slopes): none (p near 1), moderate, and strong in the other direction (p near 0), so both signs occur.
EFFECTS = {"null": 0.0, "moderate": 0.3, "strong": -3.0}


def assert_same(mine, expected, case: object = "") -> None:
    np.testing.assert_allclose(np.asarray(mine, dtype=float), np.asarray(expected, dtype=float), rtol=RTOL, atol=0,
                               err_msg=str(case))


@functools.cache
def sample(n: int, tied: bool, seed: int) -> np.ndarray:
    """n normal values; rounded to 1 decimal (many ties) when tied."""
    x = np.random.default_rng(seed).normal(size=n)
    x = np.round(x, 1) if tied else x
    x.flags.writeable = False  # shared between tests through the cache
    return x


class Recorder:
    """Stands for scipy.stats in special_stats: notes each attribute used (a delegation to scipy) and what its
    functions returned."""

    def __init__(self) -> None:
        self.used: list[str] = []
        self.results: list[object] = []

    def __getattr__(self, name: str):
        self.used.append(name)
        attribute = getattr(stats, name)
        if not isinstance(attribute, types.FunctionType):
            return attribute

        def recorded(*args, **kwargs):
            self.results.append(attribute(*args, **kwargs))
            return self.results[-1]

        return recorded


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    recorder = Recorder()
    monkeypatch.setattr(ss, "stats", recorder)
    return recorder


# Distributions


def test_normal_distribution():
    for x in [-40.0, -8.5, -1.0, 0.0, 0.3, 2.0, 9.0, 38.5]:
        assert_same(ss.norm_cdf(x), stats.norm.cdf(x), x)
        assert_same(ss.norm_sf(x), stats.norm.sf(x), x)
    for q in [1e-300, 1e-20, 1e-6, 0.025, 0.5, 0.975, 1 - 1e-12]:
        assert_same(ss.norm_ppf(q), stats.norm.ppf(q), q)
        assert_same(ss.norm_isf(q), stats.norm.isf(q), q)
        assert np.signbit(ss.norm_isf(q)) == np.signbit(stats.norm.isf(q))  # 0.0, not −0.0, at q = 0.5


@pytest.mark.parametrize("df", [1, 2.5, 10, 1000])
def test_chi2_sf(df):
    for x in [0.01, 1.0, 7.5, 80.0, 1500.0]:
        assert_same(ss.chi2_sf(x, df), stats.chi2.sf(x, df), x)


@pytest.mark.parametrize(("dfn", "dfd"), [(1, 1), (1, 9), (4, 500), (99, 7), (39_999, 39_999)])
def test_f_distribution(dfn, dfd):
    for x in [0.001, 0.5, 1.0, 3.0, 40.0, 1e6]:
        assert_same(ss.f_sf(x, dfn, dfd), stats.f.sf(x, dfn, dfd), x)
    for q in [1e-300, 1e-20, 1e-10, 0.025, 0.5, 0.975, 1 - 1e-12]:
        assert_same(ss.f_ppf(q, dfn, dfd), stats.f.ppf(q, dfn, dfd), q)
        assert_same(ss.f_isf(q, dfn, dfd), stats.f.isf(q, dfn, dfd), q)


@pytest.mark.parametrize("df", [1, 2.5, 10, 1000, 79_998])
def test_noncentral_t(df):
    for nc in [-3.0, 0.0, 0.5, 4.0, 20.0]:
        for x in [-40.0, -8.3, -1.96, 0.0, 1.96, 3.0, 9.0, 38.5]:
            assert_same(ss.nct_cdf(x, df, nc), stats.nct.cdf(x, df, nc), (x, nc))
            assert_same(ss.nct_sf(x, df, nc), stats.nct.sf(x, df, nc), (x, nc))


def test_distribution_functions_outside_their_fast_domain_are_scipys(recorder):
    cases = [(ss.norm_cdf, stats.norm.cdf, (np.inf,)), (ss.norm_ppf, stats.norm.ppf, (0.0,)),
             (ss.norm_isf, stats.norm.isf, (1.0,)), (ss.chi2_sf, stats.chi2.sf, (0.0, 3)),
             (ss.f_sf, stats.f.sf, (-1.0, 2, 3)), (ss.f_isf, stats.f.isf, (0.5, 0, 3)),
             (ss.f_ppf, stats.f.ppf, (2.0, 2, 3)), (ss.nct_sf, stats.nct.sf, (np.inf, 5, 1)),
             (ss.nct_cdf, stats.nct.cdf, (1.0, -1, 1))]
    for mine, theirs, args in cases:
        recorder.used.clear()
        np.testing.assert_equal(mine(*args), theirs(*args))
        assert recorder.used, mine.__name__


# Ranks


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_ranks_and_tie_counts(n, tied):
    x = sample(n, tied, 1)
    ranks, ties = ss.ranks_and_ties(x)
    expected_ranks, expected_ties = _rankdata(x, "average", return_ties=True)
    assert_same(ss.rankdata(x), stats.rankdata(x))
    assert_same(ranks, expected_ranks)
    assert_same(ties, expected_ties)


# Rank tests


@pytest.mark.parametrize("effect", EFFECTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_mannwhitneyu(n, tied, effect):
    a, b = sample(n, tied, 2), sample(n + 7, tied, 3) + EFFECTS[effect]
    expected = stats.mannwhitneyu(a, b, alternative="two-sided")
    assert_same(ss.mannwhitneyu(a, b), (expected.statistic, expected.pvalue))


@pytest.mark.parametrize("effect", EFFECTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_wilcoxon(n, tied, effect):
    d = sample(n, tied, 4) + EFFECTS[effect]
    if tied:
        d = np.where(np.arange(n) % 7 == 3, 0.0, np.round(d, 1))  # and zeros, which wilcoxon drops
    expected = stats.wilcoxon(d)
    assert_same(ss.wilcoxon(d), (expected.statistic, expected.pvalue))


@pytest.mark.parametrize("effect", EFFECTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_kruskal(n, tied, effect):
    groups = (sample(n, tied, 5), sample(n + 2, tied, 6) + EFFECTS[effect], sample(max(n // 3, 1), tied, 7))
    assert_same(ss.kruskal(*groups), stats.kruskal(*groups))
    assert_same(ss.kruskal(*groups[:2]), stats.kruskal(*groups[:2]))


@pytest.mark.parametrize("effect", EFFECTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
def test_levene_median(n, tied, effect):
    spread = 1 + 10 * EFFECTS[effect]
    a, b, c = sample(n, tied, 8), sample(n + 4, tied, 9) * spread, sample(n, tied, 10) - 2
    assert_same(ss.levene_median(a, b), stats.levene(a, b, center="median"))
    assert_same(ss.levene_median(a, b, c), stats.levene(a, b, c, center="median"))


# Correlations


def _correlated(n: int, tied: bool, effect: str) -> tuple[np.ndarray, np.ndarray]:
    x = sample(n, tied, 11)
    y = EFFECTS[effect] * x + sample(n, tied, 12)
    return x, np.round(y, 1) if tied else y


@pytest.mark.parametrize("effect", EFFECTS)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", ["spearmanr", "pearsonr"])
def test_correlations(name, n, tied, effect):
    x, y = _correlated(n, tied, effect)
    assert_same(getattr(ss, name)(x, y), getattr(stats, name)(x, y))


@pytest.mark.parametrize("sign", [1, -1])
def test_perfect_correlation_has_p_zero(sign):
    x = np.arange(12) * 0.1 + 0.1
    monotone, linear = sign * x**3, sign * (2.9 * x - 1.3)  # rho is exactly ±1 and its t infinite
    assert ss.spearmanr(x, monotone) == (stats.spearmanr(x, monotone).statistic, 0.0) == (sign, 0.0)
    # The normalised deviations' dot product is ±1.0000000000000002 here: scipy clips it to ±1.
    assert ss.pearsonr(x, linear) == (stats.pearsonr(x, linear).statistic, 0.0) == (sign, 0.0)


def test_extreme_p_values_near_the_smallest_double():
    """Effects tuned so that scipy's p is below 1e-250 (or underflows to 0): the tail formulas, not only the bulk,
    are scipy's."""
    def normal(seed: int, size: int, mean: float = 0.0, scale: float = 1.0) -> np.ndarray:
        return np.random.default_rng(seed).normal(mean, scale, size=size)

    a, b, d = normal(1, 1000), normal(2, 1000, 3.0), normal(3, 4000, 0.65)
    wide = normal(6, 1000, scale=20.0)
    x = normal(4, 400)
    y = x + normal(5, 400, scale=0.2)
    cases = [(ss.mannwhitneyu(a, b), stats.mannwhitneyu(a, b, alternative="two-sided")),
             (ss.wilcoxon(d), stats.wilcoxon(d)), (ss.kruskal(a, b), stats.kruskal(a, b)),
             (ss.spearmanr(x, y), stats.spearmanr(x, y)), (ss.pearsonr(x, y), stats.pearsonr(x, y)),
             (ss.levene_median(a, wide), stats.levene(a, wide, center="median"))]
    for mine, expected in cases:
        assert 0 < expected.pvalue < 1e-250 or expected.pvalue == 0
        assert_same(mine, expected)
    assert any(0 < expected.pvalue < 1e-250 for _, expected in cases)


# Contingency tables


def _tables(seed: int, count: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 10 ** rng.integers(1, 6), size=(2, 2)).tolist() for _ in range(count)]


FISHER_TABLES = [
    [[0, 5], [5, 0]], [[3, 1], [1, 3]], [[10, 10], [10, 10]], [[1, 2], [3, 4]], [[0, 0], [3, 4]], [[0, 3], [0, 4]],
    [[50_000, 0], [0, 50_000]], [[25_000, 25_000], [25_010, 24_990]], [[100, 49_900], [150, 49_850]],
    [[1, 99_999], [0, 1]], [[7, 12], [30_000, 20_000]], [[0, 40_000], [3, 59_997]], [[2_000, 3], [5, 4_000]],
    *_tables(14, 60)]


def test_fisher_exact_2x2():
    """The same Boost hypergeometric routines and search as scipy's, so rtol 1e-12 holds on every table (a log-space
    pmf would need about 1e-9); the tables give p of 1, in between, and below 1e-300."""
    p_values = []
    for table in FISHER_TABLES:
        expected = stats.fisher_exact(table)
        assert_same(ss.fisher_exact_2x2(table), (expected.statistic, expected.pvalue), table)
        p_values.append(expected.pvalue)
    assert min(p_values) < 1e-300 and 1.0 in p_values and any(1e-10 < p < 0.5 for p in p_values)


def _rxc_tables(seed: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 10 ** rng.integers(1, 6), size=(rows, columns)).tolist()
            for rows in (2, 3) for columns in (2, 3, 5, 8) for _ in range(4)]


CHI2_TABLES = [[[3, 1], [1, 3]], [[0, 5], [5, 0]], [[10, 10], [10, 10]], [[0, 7, 3], [4, 0, 9]], [[5, 5, 5]],
               [[3], [4]], [[50_000, 0], [0, 50_000]], [[25_000, 25_000, 1], [25_010, 24_990, 0]],
               [[1, 2, 3, 40_000], [4, 5, 6, 39_000]],
               [[10, 10], [10, 11]], [[250, 251], [249, 250]],  # Yates: observed − expected below 0.5, not moved past
               *_rxc_tables(15)]


def test_chi2_contingency():
    for table in CHI2_TABLES:
        expected, mine = stats.chi2_contingency(table), ss.chi2_contingency(table)
        assert mine.dof == expected.dof, table
        assert_same(mine[:2], (expected.statistic, expected.pvalue), table)


# Where scipy uses an exact or permutation method, the result is scipy's own


def _auto_result(recorder: Recorder, default_call):
    """scipy's own result with its default method: the one special_stats delegated to, or else a call of ours."""
    return recorder.results[0] if recorder.used else default_call()


def _same(result, other) -> bool:
    return (result.statistic, result.pvalue) == (other.statistic, other.pvalue)


@pytest.mark.parametrize(("n1", "n2"), [(3, 3), (8, 8), (8, 40), (40, 8), (9, 9), (9, 40), (3, 600)])
@pytest.mark.parametrize("tied", [False, True])
def test_mannwhitneyu_delegates_exactly_where_scipy_is_exact(recorder, n1, n2, tied):
    a, b = sample(n1, tied, 16), sample(n2, tied, 17) + 1.5
    has_ties = np.unique(np.concatenate((a, b))).size < n1 + n2
    exact, asymptotic = (stats.mannwhitneyu(a, b, method=m) for m in ("exact", "asymptotic"))
    assert not _same(exact, asymptotic)  # the data tell the two methods apart

    mine = ss.mannwhitneyu(a, b)
    auto = _auto_result(recorder, lambda: stats.mannwhitneyu(a, b, alternative="two-sided"))
    assert bool(recorder.used) is _same(auto, exact) is (not _same(auto, asymptotic))
    assert _same(auto, asymptotic) is bool((n1 > 8 and n2 > 8) or has_ties)
    assert mine == (auto.statistic, auto.pvalue)


@pytest.mark.parametrize(("n", "kind"), [(5, "distinct"), (5, "tied"), (9, "zeros"), (13, "zeros"), (14, "zeros"),
                                         (14, "tied"), (14, "distinct"), (50, "distinct"), (50, "tied"),
                                         (51, "distinct")])
def test_wilcoxon_delegates_exactly_where_scipy_is_exact_or_permutes(recorder, n, kind):
    d = sample(n, kind == "tied", 18) + 0.8
    if kind == "zeros":
        d = np.concatenate((d[:-2], [0.0, 0.0]))
    has_ties = np.unique(np.abs(d[d != 0])).size < np.count_nonzero(d)
    assert bool(has_ties) is (kind == "tied")

    mine = ss.wilcoxon(d)
    auto = _auto_result(recorder, lambda: stats.wilcoxon(d))
    asymptotic = stats.wilcoxon(d, method="asymptotic")
    assert bool(recorder.used) is (not _same(auto, asymptotic))
    assert _same(auto, asymptotic) is (n > 50 or (n > 13 and kind != "distinct"))
    assert mine == (auto.statistic, auto.pvalue)


def test_large_samples_are_not_delegated(recorder):
    a, b, c = sample(500, True, 19), sample(600, False, 20), sample(500, False, 21)
    ss.mannwhitneyu(a, b)
    ss.wilcoxon(a - c)
    ss.kruskal(a, b)
    ss.levene_median(a, b)
    ss.spearmanr(a, c)
    ss.pearsonr(a, c)
    ss.fisher_exact_2x2([[100, 49_900], [150, 49_850]])
    ss.chi2_contingency([[100, 49_900, 3], [150, 49_850, 7]])
    ss.rankdata(a)
    assert recorder.used == []


NON_FINITE = np.array([0.3, np.nan, 1.2, -0.4, 2.2, 0.9, 1.1, -1.0, 0.1, 0.5, 1.7])


@pytest.mark.parametrize(("mine", "theirs", "args"), [
    (ss.mannwhitneyu, lambda a, b: stats.mannwhitneyu(a, b, alternative="two-sided"), (NON_FINITE, NON_FINITE + 1)),
    (ss.wilcoxon, stats.wilcoxon, (np.tile(NON_FINITE, 6),)),
    (ss.kruskal, stats.kruskal, (NON_FINITE, np.ones(3))),
    (ss.kruskal, stats.kruskal, (np.ones(30), np.ones(40))),
    (ss.levene_median, lambda *s: stats.levene(*s, center="median"), (np.ones(30), np.ones(40))),
    (ss.levene_median, lambda *s: stats.levene(*s, center="median"), (NON_FINITE, np.arange(40.0), [])),
    (ss.spearmanr, stats.spearmanr, (np.ones(30), np.arange(30.0))),
    (ss.spearmanr, stats.spearmanr, (NON_FINITE, np.arange(11.0))),
    (ss.pearsonr, stats.pearsonr, (np.arange(30.0), np.ones(30))),
    (ss.pearsonr, stats.pearsonr, (np.arange(2.0), np.arange(2.0))),
    (ss.pearsonr, stats.pearsonr, (1e9 + np.arange(3) * 1e-7, np.arange(3.0))),  # nearly constant: scipy warns
    (ss.fisher_exact_2x2, stats.fisher_exact, ([[1.5, 2], [3, 4]],)),
    (ss.chi2_contingency, stats.chi2_contingency, ([[[1, 2], [3, 4]], [[5, 6], [7, 9]]],)),  # three-way
    (ss.chi2_contingency, stats.chi2_contingency, ([[1, np.nan], [3, 4]],)),
])
def test_non_finite_and_degenerate_inputs_are_scipys(recorder, mine, theirs, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs(*args)
        got = mine(*args)
    assert recorder.used
    np.testing.assert_equal(got[:2], (expected.statistic, expected.pvalue))


@pytest.mark.parametrize("table", [[[0, 0], [3, 4]], [[1, -2], [3, 4]], []])
def test_tables_scipy_rejects_are_rejected_alike(recorder, table):
    with pytest.raises(ValueError) as expected:
        stats.chi2_contingency(table)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        ss.chi2_contingency(table)
    assert recorder.used


def test_the_large_sample_paths_do_not_import_scipy_stats():
    code = textwrap.dedent("""
        import sys

        import numpy as np

        from consumers.report import special_stats as ss

        rng = np.random.default_rng(22)
        a, b = np.round(rng.normal(size=2000), 2), rng.normal(0.1, 1, size=2100)
        values = [
            ss.norm_cdf(0.3), ss.norm_sf(2.0), ss.norm_ppf(0.025), ss.norm_isf(0.025), ss.chi2_sf(3.0, 2),
            ss.f_sf(1.5, 3, 40), ss.f_ppf(0.025, 3, 40), ss.f_isf(0.025, 3, 40), ss.nct_cdf(-1.9, 30, 0.5),
            ss.nct_sf(1.9, 30, 0.5), ss.rankdata(a)[0], *ss.mannwhitneyu(a, b), *ss.wilcoxon(a - b[:2000]),
            *ss.kruskal(a, b), *ss.levene_median(a, b), *ss.spearmanr(a, b[:2000]), *ss.pearsonr(a, b[:2000]),
            *ss.fisher_exact_2x2([[100, 49_900], [150, 49_850]]), *ss.chi2_contingency([[10, 20, 30], [20, 20, 25]]),
        ]
        assert all(np.isfinite(values)), values
        assert "scipy.special._ufuncs" in sys.modules and "scipy.stats" not in sys.modules, "scipy.stats was imported"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ok"]


def test_the_pinned_scipy_is_the_release_these_functions_reproduce():
    """infra/constraints.txt installs the scipy these formulas were copied from: the own computations run."""
    pinned = re.search(r"^scipy==(\d+)\.(\d+)\.", (Path(__file__).parents[1] / "infra" / "constraints.txt").read_text(),
                       re.MULTILINE)
    assert pinned and tuple(map(int, pinned.groups())) == ss.REPRODUCED_SCIPY
    assert ss.reproduces_scipy()


TWO_BY_TWO, TWO_BY_THREE = [[100, 49_900], [150, 49_850]], [[100, 900, 3], [150, 850, 7]]


def test_with_another_scipy_release_every_function_asks_scipy_stats(recorder, monkeypatch):
    """pyproject admits other scipy releases, whose formulas, method choices or private routines may differ: then
    nothing is computed here, and each result is scipy.stats' own."""
    monkeypatch.setattr(ss, "reproduces_scipy", lambda: False)
    a, b, c = sample(500, True, 19), sample(600, False, 20), sample(500, False, 21)
    calls = [
        (ss.mannwhitneyu, (a, b), lambda: stats.mannwhitneyu(a, b, alternative="two-sided")),
        (ss.wilcoxon, (a - c,), lambda: stats.wilcoxon(a - c)),
        (ss.kruskal, (a, b), lambda: stats.kruskal(a, b)),
        (ss.levene_median, (a, b), lambda: stats.levene(a, b, center="median")),
        (ss.spearmanr, (a, c), lambda: stats.spearmanr(a, c)),
        (ss.pearsonr, (a, c), lambda: stats.pearsonr(a, c)),
        (ss.fisher_exact_2x2, (TWO_BY_TWO,), lambda: stats.fisher_exact(TWO_BY_TWO)),
        (ss.chi2_contingency, (TWO_BY_THREE,), lambda: stats.chi2_contingency(TWO_BY_THREE)),
    ]
    for mine, args, theirs in calls:
        got, expected = mine(*args), theirs()
        assert (got.statistic, got.pvalue) == (float(expected.statistic), float(expected.pvalue)), mine.__name__
    for mine, args, theirs in [
            (ss.norm_cdf, (1.5,), stats.norm.cdf), (ss.norm_sf, (1.5,), stats.norm.sf),
            (ss.norm_ppf, (0.3,), stats.norm.ppf), (ss.norm_isf, (0.3,), stats.norm.isf),
            (ss.chi2_sf, (3.0, 2.0), stats.chi2.sf), (ss.f_sf, (2.0, 3.0, 40.0), stats.f.sf),
            (ss.f_ppf, (0.2, 3.0, 40.0), stats.f.ppf), (ss.f_isf, (0.2, 3.0, 40.0), stats.f.isf),
            (ss.nct_cdf, (1.0, 20.0, 0.5), stats.nct.cdf), (ss.nct_sf, (1.0, 20.0, 0.5), stats.nct.sf)]:
        assert mine(*args) == float(theirs(*args)), mine.__name__
    np.testing.assert_array_equal(ss.rankdata(a), stats.rankdata(a))
    assert {"mannwhitneyu", "wilcoxon", "kruskal", "levene", "spearmanr", "pearsonr", "fisher_exact",
            "chi2_contingency", "norm", "chi2", "f", "nct", "rankdata"} <= set(recorder.used)
