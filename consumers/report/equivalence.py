"""Equivalence and dominance of the two arms beyond a significance test: TOST within ±margin (paired or Welch),
Almost Stochastic Order's ε_min (Dror et al. 2019, as deepsig computes it) and the Bayesian signed-rank test with a
region of practical equivalence (Benavoli et al. 2014/2017, as baycomp computes it). Differences are a − b.

tests/test_equivalence.py checks each against its reference (statsmodels' ttost_paired / ttost_ind, deepsig.aso,
baycomp.SignedRankTest) on fixed data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from consumers.report.special_stats import norm_ppf
from consumers.report.stats import t_sf, variance

ASO_DT = 0.005  # deepsig's default grid step of the quantile integrals
ASO_BOOTSTRAP = 1000
ASO_CONFIDENCE = 0.95
# The Bayesian signed-rank test draws this many Dirichlet weight vectors, fewer for large n so that one report
# stays within ~1e6 weight evaluations (the Monte Carlo error of a probability at 100 draws is at most ±5
# percentage points; with 10,000 pairs and more the posterior is so narrow that the figures are 0 or 1 anyway).
BAYES_SAMPLES = 50_000
BAYES_BUDGET = 1_000_000
BAYES_MIN_SAMPLES = 100
BAYES_CHUNK = 2_000_000  # weights held in memory at once
BAYES_PRIOR = 0.5  # baycomp's weight of the pseudo-observation at 0


@dataclass(frozen=True)
class Tost:
    """Two one-sided tests of |a − b| < margin: p = the larger one-sided p; equivalent when p < α."""

    margin: float
    p_value: float | None = None
    p_lower: float | None = None
    p_upper: float | None = None
    df: float | None = None


def _tost(estimate: float, se: float, df: float, margin: float) -> Tost:
    if se == 0:
        inside = -margin < estimate < margin
        return Tost(margin, 0.0 if inside else 1.0, None, None, df)
    p_lower = t_sf((estimate + margin) / se, df)  # H0: difference ≤ −margin
    p_upper = t_sf(-(estimate - margin) / se, df)  # H0: difference ≥ +margin (the cdf at x is the sf at −x)
    return Tost(margin, max(p_lower, p_upper), p_lower, p_upper, df)


def tost_paired(a: Sequence[float], b: Sequence[float], margin: float) -> Tost:
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return Tost(margin)
    return _tost(float(d.mean()), math.sqrt(variance(d) / len(d)), len(d) - 1, margin)


def tost_welch(a: Sequence[float], b: Sequence[float], margin: float) -> Tost:
    if len(a) < 2 or len(b) < 2:
        return Tost(margin)
    va, vb = variance(a) / len(a), variance(b) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se else len(a) + len(b) - 2
    return _tost(float(np.mean(a) - np.mean(b)), se, float(df), margin)


def _grid(dt: float) -> np.ndarray:
    return np.arange(dt, 1, dt)


def _order_indices(n: int, t: np.ndarray) -> np.ndarray:
    """deepsig's empirical quantile at t: the ceil(n·t)-th order statistic (1-based, clipped to 1..n)."""
    return np.clip(np.ceil(n * t).astype(int), 1, n)


def violation_ratio(qa: np.ndarray, qb: np.ndarray, dt: float = ASO_DT) -> np.ndarray:
    """ε_W2 of quantile curves qa, qb (last axis = the grid): the share of the squared Wasserstein distance where
    a is below b (the order a ≥ b is violated); 0.5 where the distributions are equal."""
    diff = qb - qa
    total = np.sum(diff**2, axis=-1) * dt
    violated = np.where(qa >= qb, 0.0, diff)
    part = np.sum(violated[..., 1:] ** 2, axis=-1) * dt
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total == 0, 0.5, part / np.where(total == 0, 1, total))


def _bootstrap_quantiles(sorted_x: np.ndarray, t: np.ndarray, iterations: int,
                         rng: np.random.Generator) -> np.ndarray:
    """Quantile curves of `iterations` bootstrap resamples of x, without drawing n values each time: the k-th order
    statistic of n uniforms is G_k / G_{n+1} for G the partial sums of n + 1 unit exponentials, so the order
    statistics at the grid's ranks come from one gamma variate per grid step (exact, O(grid) per resample)."""
    n = len(sorted_x)
    ranks = _order_indices(n, t)
    steps = np.diff(np.concatenate([[0], ranks, [n + 1]]))
    gammas = np.where(steps > 0, rng.standard_gamma(np.maximum(steps, 1), size=(iterations, len(steps))), 0.0)
    sums = np.cumsum(gammas, axis=1)
    uniforms = sums[:, :-1] / sums[:, -1:]
    return sorted_x[np.clip(np.ceil(n * uniforms).astype(int) - 1, 0, n - 1)]


@dataclass(frozen=True)
class Aso:
    """ε_min < 0.5: a is almost stochastically larger than b at the confidence level; near 1: b over a."""

    epsilon_min: float | None = None
    violation_ratio: float | None = None
    bootstrap: int = ASO_BOOTSTRAP


def aso(a: Sequence[float], b: Sequence[float], *, seed: int = 0, iterations: int = ASO_BOOTSTRAP,
        confidence: float = ASO_CONFIDENCE, dt: float = ASO_DT) -> Aso:
    """Almost Stochastic Order of a over b: deepsig.aso's estimator (same grid, same bootstrap of σ, same bound),
    seeded, so a report is reproducible."""
    if len(a) == 0 or len(b) == 0:
        return Aso(bootstrap=iterations)
    xa, xb = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    t = _grid(dt)
    ratio = float(violation_ratio(xa[_order_indices(len(xa), t) - 1], xb[_order_indices(len(xb), t) - 1], dt))
    rng = np.random.default_rng(seed)
    samples = violation_ratio(_bootstrap_quantiles(xa, t, iterations, rng),
                              _bootstrap_quantiles(xb, t, iterations, rng), dt)
    const = math.sqrt(len(xa) * len(xb) / (len(xa) + len(xb)))
    sigma = float(np.std(const * (samples - ratio)))
    bound = ratio - sigma / const * norm_ppf(1 - confidence)
    return Aso(float(np.clip(bound, 0, 1)), ratio, iterations)


@dataclass(frozen=True)
class BayesSignedRank:
    """Posterior probabilities that "a better" (a − b beyond +rope), "equivalent" (within ±rope) or "b better" is
    the most probable of the three regions, as baycomp's `probs` reports them; they sum to 1."""

    rope: float
    p_a_better: float | None = None
    p_equivalent: float | None = None
    p_b_better: float | None = None
    samples: int = 0


def _weighted_mass(weights: np.ndarray, cumulative: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Per draw, Σ_i w_i · 0.5 · (cumulative[first_i] + cumulative[second_i]): one gather where no value ties a
    bound (both cuts are then equal), and row dot products rather than temporaries the size of the draws."""
    def dot(cut: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", weights, np.take(cumulative, cut, axis=1))
    if np.array_equal(first, second):
        return dot(first)
    return 0.5 * (dot(first) + dot(second))


def bayes_signed_rank(a: Sequence[float], b: Sequence[float], rope: float, *, seed: int = 0,
                      samples: int | None = None) -> BayesSignedRank:
    """baycomp's SignedRankTest (Dirichlet-process signed rank, prior weight 0.5 on a pseudo-observation at 0):
    for each posterior weight vector w, the mass of "a better" is Σ_ij w_i w_j [d_i + d_j > 2·rope] (ties count
    ½). The double sum is computed from sorted differences and prefix sums of w: O(n) per draw."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if len(d) < 2:
        return BayesSignedRank(rope)
    n = len(d) + 1
    draws = samples or max(BAYES_MIN_SAMPLES, min(BAYES_SAMPLES, BAYES_BUDGET // n))
    values = np.concatenate([[0.0], d])
    order = np.argsort(values, kind="stable")
    values = values[order]
    prior = np.ones(n)
    prior[0] = BAYES_PRIOR
    # For "a better", j counts where v_j > 2·rope − v_i, for "b better" where v_j < −2·rope − v_i; ties count ½.
    above, below = 2 * rope - values, -2 * rope - values
    cuts = {name: np.searchsorted(values, bound, side=side) for name, bound, side in (
        ("above_right", above, "right"), ("above_left", above, "left"),
        ("below_right", below, "right"), ("below_left", below, "left"))}
    rng = np.random.default_rng(seed)
    counts = np.zeros(3)
    for start in range(0, draws, max(1, BAYES_CHUNK // n)):
        weights = rng.dirichlet(prior[order], min(draws - start, max(1, BAYES_CHUNK // n)))
        cumulative = np.empty((len(weights), n + 1))
        cumulative[:, 0] = 0
        np.cumsum(weights, axis=1, out=cumulative[:, 1:])
        total = cumulative[:, -1]
        # Σ_i w_i (total − mass at or below i's cut) = total² − Σ_i w_i · mass below the cut
        better = total * total - _weighted_mass(weights, cumulative, cuts["above_right"], cuts["above_left"])
        worse = _weighted_mass(weights, cumulative, cuts["below_left"], cuts["below_right"])
        regions = np.stack([better, 1 - better - worse, worse], axis=1)
        counts += np.bincount(np.argmax(regions, axis=1), minlength=3)
    winners = counts / draws
    return BayesSignedRank(rope, *map(float, winners), draws)
