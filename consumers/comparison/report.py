"""The comparison report: load a consistent snapshot of the read model, then build a plain, stable dict from it.

`build_report` is pure (data in, dict out); docs/report.md documents every field of its result, which is also the
`sntrack report --format json` output. Bump REPORT_VERSION when a field changes meaning or disappears.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import asyncpg

from consumers.comparison import queries
from consumers.comparison import stats as st
from consumers.projections.comparison import OVERALL

REPORT_VERSION = 1
METRIC = "final_val_accuracy"
ARMS = ("spectral_norm", "baseline")
STATUSES = ("completed", "pruned", "failed")
# Hyper-parameters that differ between the arms by construction, not by confounding.
NOT_CONFOUNDERS = frozenset({"spectral_norm"})


@dataclass(frozen=True)
class TrialRecord:
    id: str
    spectral_norm: bool
    status: str
    val: float | None = None
    train: float | None = None
    duration_ms: float | None = None
    hyperparams: dict | None = None
    paired_with: str | None = None

    @property
    def gap(self) -> float | None:
        return None if self.val is None or self.train is None else self.train - self.val


@dataclass(frozen=True)
class CurvePoint:
    spectral_norm: bool
    epoch: int
    n: int
    mean: float | None
    std: float | None


@dataclass(frozen=True)
class ComparisonData:
    trials: list[TrialRecord]
    # sn_comparison rows keyed by (spectral_norm, status); None when the filter is not one sn_comparison keeps.
    aggregates: dict[tuple[bool, str], dict] | None
    curves: list[CurvePoint]
    model_run_id: str | None = None
    dataset: str | None = None

    def arm(self, spectral_norm: bool) -> list[TrialRecord]:
        return [t for t in self.trials if t.spectral_norm is spectral_norm]

    def completed_values(self, spectral_norm: bool) -> list[float]:
        return [t.val for t in self.arm(spectral_norm) if t.status == "completed" and t.val is not None]


async def load(conn: asyncpg.Connection, model_run_id: str | None = None,
               dataset: str | None = None) -> ComparisonData:
    """Read trials, their curves and the sn_comparison rows in one repeatable-read snapshot."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(queries.REPORT_TRIALS, model_run_id, dataset)
        curves = await conn.fetch(queries.REPORT_CURVES, model_run_id, dataset)
        aggregates = None
        if dataset is None:
            found = await conn.fetch(queries.REPORT_AGGREGATES, model_run_id or OVERALL)
            aggregates = {(r["spectral_norm"], r["status"]): dict(r) for r in found}
    trials = [TrialRecord(r["id"], r["spectral_norm"], r["status"], r["val"], r["train"], r["duration_ms"],
                          json.loads(r["hyperparams"]), r["paired_with"]) for r in rows]
    points = [CurvePoint(r["spectral_norm"], r["epoch"], r["n"], r["mean"], r["std"]) for r in curves]
    return ComparisonData(trials, aggregates, points, model_run_id, dataset)


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


def _counts(trials: Sequence[TrialRecord]) -> dict[str, int]:
    counts = {s: sum(t.status == s for t in trials) for s in (*STATUSES, "running")}
    return {**counts, "total": len(trials)}


def _arm_from_trials(trials: Sequence[TrialRecord]) -> dict:
    done = [t for t in trials if t.status == "completed"]
    return {
        "trials": _counts(trials),
        "final_val_accuracy": _summary(st.summarize([t.val for t in done if t.val is not None])),
        "train_val_gap": _summary(st.summarize([t.gap for t in done if t.gap is not None])),
        "duration_ms": _summary(st.summarize([t.duration_ms for t in done if t.duration_ms is not None])),
    }


def _arm_from_aggregates(rows: dict[tuple[bool, str], dict], spectral_norm: bool,
                         trials: Sequence[TrialRecord]) -> dict:
    """Counts and summaries from sn_comparison; only the medians (which no sufficient statistic gives) and the
    running count (sn_comparison counts stops) come from the trials."""
    from_trials = _arm_from_trials(trials)
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


def complete_pairs(trials: Sequence[TrialRecord]) -> tuple[list[tuple[TrialRecord, TrialRecord]], int]:
    """Pairs linked by `paired_with` (either direction) with one trial per arm, both completed with a final
    validation accuracy, as (SN, baseline); and how many linked pairs there are in all."""
    by_id = {t.id: t for t in trials}
    links = {frozenset((t.id, t.paired_with)) for t in trials
             if t.paired_with and t.paired_with in by_id and t.paired_with != t.id}
    used: set[str] = set()
    pairs = []
    for link in sorted(links, key=sorted):
        first, second = (by_id[i] for i in sorted(link))
        if first.spectral_norm == second.spectral_norm or link & used:
            continue
        used |= link
        sn, base = (first, second) if first.spectral_norm else (second, first)
        if all(t.status == "completed" and t.val is not None for t in (sn, base)):
            pairs.append((sn, base))
    return pairs, len(links)


def _fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


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


def _rate(data: ComparisonData, status: str, alpha: float) -> dict:
    finished = [[t for t in data.arm(flag) if t.status != "running"] for flag in (True, False)]
    k = [sum(t.status == status for t in arm) for arm in finished]
    result = st.compare_rates(k[0], len(finished[0]), k[1], len(finished[1]))
    differs = result.p_value is not None and result.p_value < alpha
    return {"spectral_norm": result.rate_a, "baseline": result.rate_b, "p_value": result.p_value,
            "test": "fisher_exact", "differs": differs}


def _confounding(data: ComparisonData, alpha: float) -> list[dict]:
    arms = [[t.hyperparams or {} for t in data.arm(flag) if t.status == "completed"] for flag in (True, False)]
    names = sorted({k for arm in arms for h in arm for k in h} - NOT_CONFOUNDERS)
    found = []
    for name in names:
        result = st.compare_distributions(*([h[name] for h in arm if name in h] for arm in arms))
        if result is not None:
            found.append({"hyperparam": name, "test": result.test, "statistic": result.statistic,
                          "p_value": result.p_value, "differs": result.p_value < alpha})
    return found


def _verdict(sn: list[float], base: list[float], tests: dict, difference: dict, power: dict, paired_design: bool,
             warnings: list[str], alpha: float) -> dict:
    if paired_design:
        candidates = [("paired_t", "paired t-test", tests["paired"]["t_test"]),
                      ("wilcoxon_signed_rank", "Wilcoxon signed-rank test", tests["paired"]["wilcoxon_signed_rank"])]
    else:
        candidates = [("welch_t", "Welch's t-test", tests["welch_t"]),
                      ("mann_whitney_u", "Mann–Whitney U test", tests["mann_whitney_u"])]
    verdict = {"text": "", "significant": None, "test": None, "p_value": None}
    if not paired_design and (len(sn) < 2 or len(base) < 2):
        verdict["text"] = (f"not enough trials: spectral norm has {len(sn)} completed trial(s) with a final "
                           f"validation accuracy, baseline {len(base)}; a comparison needs at least 2 per arm.")
        return verdict
    usable = [(key, name, t) for key, name, t in candidates if t["p_value"] is not None]
    if not usable:
        verdict["text"] = ("no test possible: every trial in each arm has the same final validation accuracy "
                           f"(zero variance); observed difference SN − baseline = {difference['estimate']:+.4f}.")
        return verdict
    key, name, test = usable[0]
    p = test["p_value"]
    significant = p < alpha
    verdict.update(significant=significant, test=key, p_value=p)
    estimate = difference["estimate"]
    interval = ("" if difference["ci_low"] is None else
                f" (95% CI {difference['ci_low']:+.4f} to {difference['ci_high']:+.4f})")
    observed = power["observed"]
    unit = power["unit"]
    if significant:
        direction = "higher" if estimate > 0 else "lower"
        text = (f"spectral normalization gave {direction} final validation accuracy than the baseline at "
                f"α = {alpha:g} (p = {_fmt_p(p)}, {name}): SN − baseline = {estimate:+.4f}{interval}.")
        if observed["power"] is not None:
            text += f" Achieved power for the observed difference: {observed['power']:.0%}."
        if warnings:
            text += " See the warnings: the arms differ in more than the flag, so this is an association, not proof."
    else:
        text = (f"no significant difference at α = {alpha:g} (p = {_fmt_p(p)}, {name}); "
                f"observed SN − baseline = {estimate:+.4f}{interval}.")
        targets = [("the observed difference", observed)]
        if power["min_effect"]["effect"] is not None:
            targets.append((f"a difference of {power['min_effect']['effect']:g}", power["min_effect"]))
        for label, block in targets:
            if block["standardized_effect"] is None:
                continue
            if block["required_n"] is None:
                text += f" Detecting {label} with 80% power would need more than {st.MAX_N:,} {unit}."
            else:
                text += (f" To detect {label} with 80% power at α = {alpha:g}: {block['required_n']} {unit} "
                         f"({block['additional']} more).")
    verdict["text"] = text
    return verdict


def build_report(data: ComparisonData, *, min_effect: float | None = None, alpha: float = st.ALPHA,
                 now: datetime | None = None) -> dict:
    sn, base = data.completed_values(True), data.completed_values(False)
    by_flag = {True: data.arm(True), False: data.arm(False)}
    warnings: list[str] = []

    arms = {name: _arm_from_trials(by_flag[flag]) for name, flag in zip(ARMS, (True, False), strict=True)}
    source = "trials"
    if data.aggregates is not None:
        from_aggregates = {name: _arm_from_aggregates(data.aggregates, flag, by_flag[flag])
                           for name, flag in zip(ARMS, (True, False), strict=True)}
        if all(from_aggregates[a]["trials"] == arms[a]["trials"] for a in ARMS):
            arms, source = from_aggregates, "sn_comparison"
        else:
            warnings.append("sn_comparison does not match the trials read model yet (the comparison consumer is "
                            "behind); the per-arm figures are computed from trials.")
    for name, flag in zip(ARMS, (True, False), strict=True):
        best = max((t for t in by_flag[flag] if t.status == "completed" and t.val is not None),
                   key=lambda t: (t.val, t.id), default=None)
        arms[name]["best"] = {"trial_id": best.id if best else None, METRIC: best.val if best else None}

    pairs, linked = complete_pairs(data.trials)
    paired = st.paired([a.val for a, _ in pairs], [b.val for _, b in pairs])
    paired_design = paired.n_pairs >= 2
    tests = {
        "welch_t": asdict(st.welch_test(sn, base)),
        "mann_whitney_u": asdict(st.mann_whitney(sn, base)),
        "paired": {"n_pairs": paired.n_pairs, "n_linked_pairs": linked,
                   "mean_difference": asdict(paired.difference), "t_test": asdict(paired.t_test),
                   "wilcoxon_signed_rank": asdict(paired.wilcoxon)},
    }
    difference = asdict(paired.difference if paired_design else st.welch_difference(sn, base))

    rates = {status: _rate(data, status, alpha) for status in ("pruned", "failed")}
    for status, rate in rates.items():
        if rate["differs"]:
            warnings.append(f"{status} rates differ between the arms (SN {rate['spectral_norm']:.0%}, baseline "
                            f"{rate['baseline']:.0%}; Fisher's exact p = {_fmt_p(rate['p_value'])}): the completed "
                            "trials compared may be a biased selection.")
    confounding = [] if paired_design else _confounding(data, alpha)
    differing = [c for c in confounding if c["differs"]]
    if differing:
        listed = ", ".join(f"{c['hyperparam']} (p = {_fmt_p(c['p_value'])})" for c in differing)
        warnings.append(f"the arms' hyper-parameters are distributed differently: {listed}, of {len(confounding)} "
                        f"tested at α = {alpha:g} without correction; an adaptive sampler may have confounded "
                        "the flag.")

    durations = [[t.duration_ms for t in by_flag[flag] if t.status == "completed" and t.duration_ms is not None]
                 for flag in (True, False)]
    mean_sn, mean_base = (arms[a]["duration_ms"]["mean"] for a in ARMS)
    overhead = mean_sn / mean_base - 1 if mean_sn is not None and mean_base else None

    if paired_design:
        diffs = [a.val - b.val for a, b in pairs]
        scale, n_now, unit = st.summarize(diffs).std, (paired.n_pairs,), "complete pairs"
    else:
        scale, n_now, unit = st.pooled_std(sn, base), (len(sn), len(base)), "completed trials per arm"
    power = {
        "design": "paired" if paired_design else "independent",
        "alpha": alpha, "target_power": st.TARGET_POWER, "unit": unit,
        "observed": _power_block(difference["estimate"], scale, n_now, paired_design, alpha),
        "min_effect": _power_block(min_effect, scale, n_now, paired_design, alpha),
    }
    verdict = _verdict(sn, base, tests, difference, power, paired_design, warnings, alpha)

    curves = {name: [{"epoch": p.epoch, "n": p.n, "mean": p.mean,
                      **dict(zip(("ci_low", "ci_high"), st.t_interval(p.n, p.mean, p.std), strict=True))}
                     for p in data.curves if p.spectral_norm is flag]
              for name, flag in zip(ARMS, (True, False), strict=True)}
    return _clean({
        "report_version": REPORT_VERSION,
        "generated_at": (now or datetime.now(UTC)).isoformat(),
        "filters": {"model_run_id": data.model_run_id, "dataset": data.dataset},
        "metric": METRIC,
        "alpha": alpha,
        "source": source,
        "arms": arms,
        "difference": difference,
        "tests": tests,
        "effect_sizes": {"hedges_g": st.hedges_g(sn, base), "cliffs_delta": st.cliffs_delta(sn, base)},
        "training_time": {"overhead": overhead, "difference_ms": asdict(st.welch_difference(*durations))},
        "rates": rates,
        "confounding": confounding,
        "power": power,
        "verdict": verdict,
        "warnings": warnings,
        "curves": curves,
    })
