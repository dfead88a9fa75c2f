"""The comparison report: from a snapshot of the read model (consumers.report.snapshot), a plain, stable dict.

`build_report` is pure (data in, dict out); docs/report.md documents every field of its result, which is also the
`sntrack report --format json` output. Bump REPORT_VERSION when a field changes meaning, appears or disappears.
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial

import numpy as np

from consumers.report import equivalence as eq
from consumers.report import explore, forked, manipulation, robustness
from consumers.report import stats as st
from consumers.report import verdict as vd
from consumers.report.columns import Columns, Lazily
from consumers.report.snapshot import ComparisonData, TrialRecord, paused_gc

REPORT_VERSION = 2
MIN_EFFECT = 0.01  # the default smallest difference of interest (absolute accuracy)
METRIC = "final_val_accuracy"
ARMS = ("spectral_norm", "baseline")
STATUSES = ("completed", "pruned", "failed")
# Hyper-parameters that differ between the arms by construction, not by confounding.
NOT_CONFOUNDERS = frozenset({"spectral_norm"})


def _finite(value):
    """JSON-safe: numpy scalars to float, NaN/inf to None."""
    if value is None or isinstance(value, bool | int | str):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return _finite(obj)


def _summary(summary: st.Summary) -> dict:
    return asdict(summary)


def _arm_from_trials(c: Columns, arm: np.ndarray) -> dict:
    completed = c.completed & arm
    return {
        "trials": c.counts(arm),
        "final_val_accuracy": _summary(st.summarize(c.val[completed & c.val_present])),
        "train_val_gap": _summary(st.summarize((c.train - c.val)[completed & c.val_present & c.train_present])),
        "duration_ms": _summary(st.summarize(c.duration[completed & c.duration_present])),
    }


def _arm_from_aggregates(rows: dict[tuple[bool, str], dict], spectral_norm: bool, from_trials: dict) -> dict:
    """Counts and summaries from sn_comparison; only the medians (which no sufficient statistic gives) and the
    running count (sn_comparison counts stops) come from the trials (`from_trials`, the arm computed from them)."""
    counts = {s: rows[(spectral_norm, s)]["trials"] if (spectral_norm, s) in rows else 0 for s in STATUSES}
    counts["running"] = from_trials["trials"]["running"]
    counts["total"] = sum(counts.values())
    row = rows.get((spectral_norm, "completed"))
    arm = {"trials": counts}
    for field, prefix in (("final_val_accuracy", "val"), ("train_val_gap", "gap"), ("duration_ms", "duration")):
        median = from_trials[field]["median"]
        arm[field] = _summary(st.Summary(0) if row is None else st.summarize_sufficient(
            row[f"{prefix}_n"], row[f"{prefix}_sum"], row[f"{prefix}_sum_sq"], row[f"{prefix}_min"],
            row[f"{prefix}_max"], median))
    return arm


def _best(c: Columns, mask: np.ndarray) -> dict:
    """The arm's trial with the highest final validation accuracy (the highest id among equal ones)."""
    found = np.flatnonzero(mask)
    best = None
    if len(found):
        values = c.val[found]
        if np.isnan(values).any():  # NaN does not order: the comparison of the records decides, as it always did
            best = max(found.tolist(), key=lambda i: (c.trials[i].val, c.ids[i]))
        else:
            best = max(found[values == values.max()].tolist(), key=c.ids.__getitem__)
    if best is None:
        return {"trial_id": None, METRIC: None}
    value = c.val[best]  # the records are made only for a NaN (a missing value), as above
    return {"trial_id": c.ids[best], METRIC: float(value) if value == value else c.trials[best].val}


def complete_pairs(trials: Sequence[TrialRecord]) -> tuple[list[tuple[TrialRecord, TrialRecord]], int]:
    """Pairs linked by `paired_with` (either direction) with one trial per arm, both completed with a final
    validation accuracy, as (SN, baseline), in the order of their sorted (lower id, higher id) links; a trial in
    several links is paired by the first. And how many linked pairs there are in all."""
    sn_index, base_index, linked = Columns(trials).pairs()
    return [(trials[a], trials[b]) for a, b in zip(sn_index.tolist(), base_index.tolist(), strict=True)], linked


def _power_block(effect: float | None, scale: float | None, n_now: tuple[int, ...], paired: bool,
                 alpha: float) -> dict:
    """Power now, and how many units 80% power needs, to detect an absolute accuracy difference `effect`."""
    standardized = effect / scale if effect is not None and scale else None
    block = {"effect": effect, "standardized_effect": standardized, "power": None, "required_n": None,
             "additional": None}
    if standardized is None:
        return block
    if paired:
        block["power"] = st.power_paired(standardized, n_now[0], alpha)
        block["required_n"] = st.required_pairs(standardized, alpha)
    else:
        block["power"] = st.power_independent(standardized, *n_now, alpha)
        block["required_n"] = st.required_per_arm(standardized, alpha)
    if block["required_n"] is not None:
        block["additional"] = sum(max(0, block["required_n"] - n) for n in n_now)
    return block


def _rate(counts: dict[bool, dict[str, int]], status: str, alpha: float) -> dict:
    """`status`'s share of each arm's finished trials, and Fisher's exact test of their equality."""
    finished = [counts[flag]["total"] - counts[flag]["running"] for flag in (True, False)]
    result = st.compare_rates(counts[True][status], finished[0], counts[False][status], finished[1])
    differs = result.p_value is not None and result.p_value < alpha
    return {"spectral_norm": result.rate_a, "baseline": result.rate_b, "p_value": result.p_value,
            "test": "fisher_exact", "differs": differs}


def _confounding(c: Columns, alpha: float) -> list[dict]:
    hps = c.hyperparams
    arms = [[hps[i] or {} for i in np.flatnonzero(c.completed & c.arm(flag)).tolist()] for flag in (True, False)]
    names = sorted({k for arm in arms for h in arm for k in h} - NOT_CONFOUNDERS)
    found = []
    for name in names:
        result = st.compare_distributions(*([h[name] for h in arm if name in h] for arm in arms))
        if result is not None:
            found.append({"hyperparam": name, "test": result.test, "statistic": result.statistic,
                          "p_value": result.p_value, "differs": result.p_value < alpha})
    return found


def _lag_warning(data: ComparisonData) -> str | None:
    if data.journal_trials is None or data.journal_trials <= len(data.trials):
        return None
    return (f"the consumers are behind or not running: the journal holds {data.journal_trials:,} trials for this "
            f"scope, the read model {len(data.trials):,} ({data.journal_trials - len(data.trials):,} not applied "
            "yet); start them with `sntrack consume all`, or wait with `sntrack status --wait-idle 60`.")


def _analyses(sn: np.ndarray, base: np.ndarray, n_pairs: int, paired_design: bool, paired_result: st.PairedResult,
              welch: st.TestResult, mann_whitney: st.TestResult) -> tuple[vd.Analysis, vd.Analysis | None]:
    independent = vd.analysis(vd.INDEPENDENT, len(sn), len(base), paired_result.n_pairs,
                              st.welch_difference(sn, base), [("welch_t", welch), ("mann_whitney_u", mann_whitney)])
    paired = vd.analysis(vd.PAIRED, n_pairs, n_pairs, paired_result.n_pairs, paired_result.difference,
                         [("paired_t", paired_result.t_test), ("wilcoxon_signed_rank", paired_result.wilcoxon)])
    return (paired, independent) if paired_design else (
        independent, paired if n_pairs else None)


def _equivalence(sn: np.ndarray, base: np.ndarray, pa: np.ndarray, pb: np.ndarray, paired_design: bool,
                 margin: float) -> tuple[dict, eq.Tost]:
    tost = eq.tost_paired(pa, pb, margin) if paired_design else eq.tost_welch(sn, base, margin)
    aso = eq.aso(pa, pb) if paired_design else eq.aso(sn, base)
    bayes = eq.bayes_signed_rank(pa, pb, margin)
    return {
        "margin": margin,
        "tost": {**asdict(tost), "design": "paired" if paired_design else "welch"},
        "aso": {**asdict(aso), "confidence": eq.ASO_CONFIDENCE, "design": "paired" if paired_design else "independent"},
        "bayes_signed_rank": {"rope": margin, "n_pairs": len(pa), "p_sn_better": bayes.p_a_better,
                              "p_equivalent": bayes.p_equivalent, "p_baseline_better": bayes.p_b_better,
                              "samples": bayes.samples},
    }, tost


def _groups(c: Columns, index: np.ndarray) -> tuple[list[tuple[str, str | None]], list[np.ndarray]]:
    """The (search, dataset) strata of the trials at `index`: their keys, and per key the positions in `index`
    (in order)."""
    at = index.tolist()
    keys = list(zip(map(c.model_run_ids.__getitem__, at), map(c.datasets.__getitem__, at), strict=True))
    codes = {key: k for k, key in enumerate(dict.fromkeys(keys))}  # in the order they first appear
    code = np.fromiter(map(codes.__getitem__, keys), np.int64, len(keys))
    if not codes:
        return [], []
    order = np.argsort(code, kind="stable")
    return list(codes), np.split(order, np.cumsum(np.bincount(code, minlength=len(codes)))[:-1])


def _strata(c: Columns, sn_index: np.ndarray, base_index: np.ndarray, paired_design: bool, alpha: float) -> dict:
    groups: dict[tuple[str, str | None], tuple[np.ndarray, np.ndarray]] = {}
    if paired_design:
        keys, members = _groups(c, sn_index)
        for key, at in zip(keys, members, strict=True):
            groups[key] = (c.val[sn_index[at]], c.val[base_index[at]])
    else:
        done = np.flatnonzero(c.done)
        keys, members = _groups(c, done)
        for key, at in zip(keys, members, strict=True):
            trials = done[at]
            arm = c.sn[trials]
            groups[key] = (c.val[trials[arm]], c.val[trials[~arm]])
    return robustness.strata(groups, paired_design, alpha)


def _where(c: Columns, sn_index: np.ndarray, base_index: np.ndarray, paired_design: bool, alpha: float) -> dict:
    hps = c.hyperparams
    if paired_design:
        entries = explore.paired([hps[i] or {} for i in sn_index.tolist()], c.val[sn_index] - c.val[base_index])
    else:
        done = np.flatnonzero(c.done)
        entries = explore.independent([hps[i] or {} for i in done.tolist()], c.sn[done], c.val[done])
    return explore.where_it_helps(entries, "paired" if paired_design else "independent", alpha)


def _curves(data: ComparisonData) -> dict:
    return {name: [{"epoch": p.epoch, "n": p.n, "mean": p.mean,
                    **dict(zip(("ci_low", "ci_high"), st.t_interval(p.n, p.mean, p.std), strict=True)),
                    "elapsed_s": p.elapsed_s}
                   for p in data.curves if p.spectral_norm is flag]
            for name, flag in zip(ARMS, (True, False), strict=True)}


def build_report(data: ComparisonData, *, min_effect: float = MIN_EFFECT, alpha: float = st.ALPHA,
                 now: datetime | None = None, fork: bool = False) -> dict:
    """The report. Degenerate inputs (zero variance, a single trial) make numpy and scipy warn; the report says
    itself what it could not compute, so their RuntimeWarnings are not printed
    (tests/test_config_errors.py::test_a_small_study_reports_without_numerical_warnings).

    `fork`: the sections that read hyper-parameters and the equivalence tests are computed in a forked child
    meanwhile (`_beside`, consumers.report.forked), the same report sooner on two cores; only where no other thread of
    the process runs (`sntrack report`)."""
    with _warnings.catch_warnings(), paused_gc():
        _warnings.simplefilter("ignore", RuntimeWarning)
        return _build_report(data, min_effect, alpha, now, fork)


def _beside(c: Columns, sn_index: np.ndarray, base_index: np.ndarray, values: tuple[np.ndarray, ...],
            paired_design: bool, alpha: float, min_effect: float) -> tuple[list[dict], dict, tuple[dict, eq.Tost]]:
    """The sections computed beside the others, in the forked child where the report forks: those that read the
    trials' hyper-parameters (parsed here, on first use), confounding and where it helps, and the equivalence tests
    (resampling for ASO and the Bayesian test) over `values` (sn, base, pa, pb as _build_report has them)."""
    confounding = [] if paired_design else _confounding(c, alpha)
    equivalence = _equivalence(*values, paired_design, min_effect)
    return confounding, _where(c, sn_index, base_index, paired_design, alpha), equivalence


def _manipulation(c: Columns) -> dict:
    """The manipulation check over the completed trials that recorded σ (parsed here, on first use; hyper-parameters
    only where the check needs them)."""
    measured = np.fromiter(map(bool, c.sigmas), bool, c.n)
    arms = []
    for mask in (c.done & c.sn, c.done & ~c.sn):
        at = np.flatnonzero(mask & measured).tolist()
        arms.append((list(map(c.ids.__getitem__, at)), list(map(c.sigmas.__getitem__, at)),
                     Lazily(c.hyperparams_at, at)))
    return manipulation.check(*arms)


def _build_report(data: ComparisonData, min_effect: float, alpha: float, now: datetime | None, fork: bool) -> dict:
    c = Columns(data.trials)
    sn_index, base_index, linked = c.pairs()
    n_pairs = len(sn_index)
    paired_design = vd.choose_design(int(c.done.sum()), n_pairs) == vd.PAIRED
    sn_done, base_done = c.done & c.sn, c.done & ~c.sn
    sn, base = c.val[sn_done], c.val[base_done]
    pa, pb = c.val[sn_index], c.val[base_index]
    beside = (forked.start if fork else partial)(_beside, c, sn_index, base_index, (sn, base, pa, pb), paired_design,
                                                 alpha, min_effect)
    warnings: list[str] = [w for w in (_lag_warning(data),) if w]

    arms = {name: _arm_from_trials(c, c.arm(flag)) for name, flag in zip(ARMS, (True, False), strict=True)}
    source = "trials"
    if data.aggregates is not None:
        from_aggregates = {name: _arm_from_aggregates(data.aggregates, flag, arms[name])
                           for name, flag in zip(ARMS, (True, False), strict=True)}
        if all(from_aggregates[a]["trials"] == arms[a]["trials"] for a in ARMS):
            arms, source = from_aggregates, "sn_comparison"
        else:
            warnings.append("sn_comparison does not match the trials read model yet (the comparison consumer is "
                            "behind); the per-arm figures are computed from trials.")
    for name, mask in zip(ARMS, (sn_done, base_done), strict=True):
        arms[name]["best"] = _best(c, mask)

    paired = st.paired(pa, pb)
    welch, mann_whitney = st.welch_test(sn, base), st.mann_whitney(sn, base)
    primary, subset = _analyses(sn, base, n_pairs, paired_design, paired, welch, mann_whitney)
    tests = {
        "welch_t": asdict(welch),
        "mann_whitney_u": asdict(mann_whitney),
        "paired": {"n_pairs": paired.n_pairs, "n_linked_pairs": linked,
                   "mean_difference": asdict(paired.difference), "t_test": asdict(paired.t_test),
                   "wilcoxon_signed_rank": asdict(paired.wilcoxon)},
    }
    difference = asdict(primary.difference)

    counts = {flag: c.counts(c.arm(flag)) for flag in (True, False)}
    rates = {status: _rate(counts, status, alpha) for status in ("pruned", "failed")}
    for status, rate in rates.items():
        if rate["differs"]:
            warnings.append(f"{status} rates differ between the arms (SN {rate['spectral_norm']:.0%}, baseline "
                            f"{rate['baseline']:.0%}; Fisher's exact p = {vd.fmt_p(rate['p_value'])}): the "
                            "completed trials compared may be a biased selection.")
    disagrees = vd.disagreement(primary, subset, alpha)
    strata = _strata(c, sn_index, base_index, paired_design, alpha)

    timed = c.duration_present & c.completed
    durations = [c.duration[timed & c.arm(flag)] for flag in (True, False)]
    mean_sn, mean_base = (arms[a]["duration_ms"]["mean"] for a in ARMS)
    overhead = mean_sn / mean_base - 1 if mean_sn is not None and mean_base else None
    # Pairs whose twins both have a duration that is not 0 (None and 0 are false, as they were in the lists).
    with_duration = c.duration_present & (c.duration != 0)
    both_timed = with_duration[sn_index] & with_duration[base_index]
    timed_sn, timed_base = c.duration[sn_index[both_timed]], c.duration[base_index[both_timed]]

    if paired_design:
        scale, n_now, unit = st.summarize(pa - pb).std, (paired.n_pairs,), "complete pairs"
    else:
        scale, n_now, unit = st.pooled_std(sn, base), (len(sn), len(base)), "completed trials per arm"
    power = {
        "design": primary.design, "alpha": alpha, "target_power": st.TARGET_POWER, "unit": unit,
        "observed": _power_block(difference["estimate"], scale, n_now, paired_design, alpha),
        "observed_caveat": "post-hoc power at the observed difference is a function of p (Hoenig & Heisey 2001); "
                           "it is context, not evidence, and stays out of the verdict",
        "min_effect": _power_block(min_effect, scale, n_now, paired_design, alpha),
    }
    epochs_done = c.done & c.epochs_present
    epochs_paired = c.epochs_present[sn_index] & c.epochs_present[base_index]
    stability = robustness.stability(sn, base, pa, pb)
    convergence = robustness.convergence(
        c.epochs[epochs_done & c.sn], c.epochs[epochs_done & ~c.sn],
        c.epochs[sn_index[epochs_paired]] - c.epochs[base_index[epochs_paired]], paired_design)
    effect_sizes = {"hedges_g": st.hedges_g(sn, base), "cliffs_delta": st.cliffs_delta(sn, base)}
    training_time = {"overhead": overhead, "difference_ms": asdict(st.welch_difference(*durations)),
                     "ratio": robustness.duration_ratio(*durations, timed_sn, timed_base)}
    curves = _curves(data)
    check = _manipulation(c)
    confounding, where_it_helps, (equivalence, tost) = beside()
    differing = [x for x in confounding if x["differs"]]
    if differing:
        listed = ", ".join(f"{x['hyperparam']} (p = {vd.fmt_p(x['p_value'])})" for x in differing)
        warnings.append(f"the arms' hyper-parameters are distributed differently: {listed}, of {len(confounding)} "
                        f"tested at α = {alpha:g} without correction; an adaptive sampler may have confounded "
                        "the flag.")
    warnings += manipulation.warnings(check)
    if disagrees:
        warnings.append(disagrees)
    if strata["signs_disagree"]:
        warnings.append(f"the {len(strata['items'])} strata (search × dataset) disagree in the sign of SN − "
                        "baseline: read the per-stratum figures and the pooled estimate, not the mixed one.")
    # The arms may differ in more than the flag: a biased selection, confounding, or a treatment that did not take.
    arms_differ = any(r["differs"] for r in rates.values()) or bool(differing) or check["passed"] is False
    verdict = vd.verdict(primary, tost, power, alpha, disagrees, arms_differ)
    return _clean({
        "report_version": REPORT_VERSION,
        "generated_at": (now or datetime.now(UTC)).isoformat(),
        "filters": {"model_run_id": data.model_run_id, "dataset": data.dataset},
        "metric": METRIC,
        "alpha": alpha,
        "min_effect": min_effect,
        "source": source,
        "arms": arms,
        "design": {"primary": primary.design, "completed_trials": int(c.done.sum()),
                   "trials_in_complete_pairs": 2 * n_pairs,
                   "rule": "paired leads when at least 2 complete pairs hold more than half the completed trials"},
        "primary": primary.as_dict(alpha),
        "subset": (subset or vd.NO_ANALYSIS).as_dict(alpha),
        "difference": difference,
        "tests": tests,
        "equivalence": equivalence,
        "effect_sizes": effect_sizes,
        "training_time": training_time,
        "rates": rates,
        "confounding": confounding,
        "manipulation": check,
        "where_it_helps": where_it_helps,
        "stability": stability,
        "convergence": convergence,
        "strata": strata,
        "power": power,
        "verdict": verdict,
        "warnings": warnings,
        "journal_trials": data.journal_trials,
        "curves": curves,
    })
