"""Beyond the mean difference: stability across seeds, convergence speed, training time as a ratio, and strata
(searches × datasets) pooled so that mixing them cannot reverse a sign."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from consumers.report import heterogeneity as het
from consumers.report import stats as st


def stability(sn: Sequence[float], base: Sequence[float], pair_sn: Sequence[float],
              pair_base: Sequence[float]) -> dict:
    """Spread of final validation accuracy per arm: variance ratio SN / baseline with its F interval and
    Brown–Forsythe over all completed trials; over complete pairs (pair_sn[i], pair_base[i]), the same ratio and
    Pitman–Morgan's paired test."""
    ratio = st.variance_ratio(sn, base)
    paired_ratio = st.variance_ratio(pair_sn, pair_base)
    return {
        "variance_ratio": {k: v for k, v in asdict(ratio).items() if k != "brown_forsythe"},
        "brown_forsythe": asdict(ratio.brown_forsythe),
        "paired": {"n_pairs": len(pair_sn), "variance_ratio": paired_ratio.ratio,
                   "pitman_morgan": asdict(st.pitman_morgan(pair_sn, pair_base))},
    }


def convergence(sn: Sequence[float], base: Sequence[float], pair_differences: Sequence[float],
                paired_design: bool) -> dict:
    """Epochs to reach 95% of a trial's final validation accuracy: per arm, and SN − baseline by the design (the
    mean of the twins' differences when paired)."""
    difference = (st.mean_difference(pair_differences) if paired_design
                  else st.welch_difference(sn, base))
    return {"threshold": 0.95, "spectral_norm": asdict(st.summarize(sn)), "baseline": asdict(st.summarize(base)),
            "difference": asdict(difference)}


def duration_ratio(sn: Sequence[float], base: Sequence[float], pair_sn: Sequence[float],
                   pair_base: Sequence[float]) -> dict:
    """SN / baseline training time as a geometric-mean ratio: over twins (pair_sn[i], pair_base[i]) when there are at
    least 2 timed pairs (the same configuration and seed, so only the flag differs), over the arms otherwise."""
    if len(pair_sn) >= 2:
        result, design = st.ratio_paired(pair_sn, pair_base), "paired twins"
    else:
        result, design = st.ratio_independent(sn, base), "independent"
    return {**asdict(result), "design": design}


def strata(groups: dict[tuple[str, str | None], tuple[list[float], list[float]]], paired_design: bool,
           alpha: float) -> dict:
    """Per (search, dataset): SN − baseline and its t-test by the scope's design (pairs as (SN, baseline) lists of
    equal length when paired), Holm-adjusted p; then the inverse-variance pooled difference with I²."""
    items = []
    for (run, dataset), (a, b) in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
        difference, test = het.stratum_difference(a, b, paired_design)
        items.append({"model_run_id": run, "dataset": dataset, "n_sn": len(a), "n_baseline": len(b),
                      "difference": asdict(difference), "p_value": test.p_value, "p_holm": None})
    for item, adjusted in zip(items, het.holm([i["p_value"] for i in items]), strict=True):
        item["p_holm"] = adjusted
    pooled = het.inverse_variance([i["difference"]["estimate"] for i in items],
                                  [i["difference"]["se"] for i in items]) if len(items) > 1 else het.Pooled()
    signs = {i["difference"]["estimate"] > 0 for i in items if i["difference"]["estimate"]}
    return {"design": "paired" if paired_design else "independent", "items": items, "pooled": asdict(pooled),
            "signs_disagree": len(signs) > 1,
            "significant_strata": sum(1 for i in items if i["p_holm"] is not None and i["p_holm"] < alpha)}
