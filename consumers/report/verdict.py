"""Which analysis leads, and the three-way verdict: better / worse (significant, with the CI), equivalent within
±min-effect (TOST by the design), or inconclusive (with how many more units 80% power needs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from consumers.report import stats as st
from consumers.report.equivalence import Tost

PAIRED, INDEPENDENT = "paired", "independent"
TEST_NAMES = {"paired_t": "paired t-test", "wilcoxon_signed_rank": "Wilcoxon signed-rank test",
              "welch_t": "Welch's t-test", "mann_whitney_u": "Mann–Whitney U test"}


def choose_design(completed: int, pairs: int) -> str:
    """Pairs lead only when they are the design of the scope: at least 2 complete pairs holding more than half of
    the completed trials. Otherwise the independent analysis leads and the pairs are a subset."""
    return PAIRED if pairs >= 2 and 2 * pairs * 2 > completed else INDEPENDENT


@dataclass(frozen=True)
class Analysis:
    design: str | None
    n_sn: int
    n_baseline: int
    n_pairs: int
    difference: st.Difference
    test: str | None
    p_value: float | None

    @property
    def n_trials(self) -> int:
        return 2 * self.n_pairs if self.design == PAIRED else self.n_sn + self.n_baseline

    @property
    def enough(self) -> bool:
        return self.n_pairs >= 2 if self.design == PAIRED else min(self.n_sn, self.n_baseline) >= 2

    def describe(self) -> str:
        if self.design == PAIRED:
            return f"{self.n_pairs:,} complete pairs ({self.n_trials:,} trials)"
        return f"{self.n_trials:,} completed trials ({self.n_sn:,} SN, {self.n_baseline:,} baseline)"

    def significant(self, alpha: float) -> bool | None:
        return None if self.p_value is None else self.p_value < alpha

    def as_dict(self, alpha: float) -> dict:
        return {"design": self.design, "n_trials": self.n_trials, "n_pairs": self.n_pairs,
                "difference": asdict(self.difference), "test": self.test, "p_value": self.p_value,
                "significant": self.significant(alpha)}


NO_ANALYSIS = Analysis(None, 0, 0, 0, st.Difference(), None, None)  # no pairs: the subset has nothing in it


def analysis(design: str, n_sn: int, n_baseline: int, n_pairs: int, difference: st.Difference,
             tests: list[tuple[str, st.TestResult]]) -> Analysis:
    """The analysis resting on the first test of `tests` that is defined (the rank test when the t-test is not)."""
    usable = [(key, t) for key, t in tests if t.p_value is not None]
    key, p = (usable[0][0], usable[0][1].p_value) if usable else (None, None)
    return Analysis(design, n_sn, n_baseline, n_pairs, difference, key, p)


def disagreement(primary: Analysis, subset: Analysis | None, alpha: float) -> str | None:
    """A sentence when the other analysis differs in sign or in significance from the leading one, else None."""
    if subset is None or not subset.enough or subset.difference.estimate is None:
        return None
    a, b = primary.difference.estimate, subset.difference.estimate
    sign = a is not None and a * b < 0
    significance = (primary.significant(alpha) is not None and subset.significant(alpha) is not None
                    and primary.significant(alpha) != subset.significant(alpha))
    if not sign and not significance:
        return None
    what = " and ".join(w for w, flag in (("sign", sign), ("significance", significance)) if flag)
    p = "–" if subset.p_value is None else fmt_p(subset.p_value)
    return (f"the {subset.design} analysis over {subset.describe()} disagrees in {what}: SN − baseline = "
            f"{b:+.4f}, p = {p} ({TEST_NAMES.get(subset.test, 'no test')}), against {a:+.4f}, p = "
            f"{'–' if primary.p_value is None else fmt_p(primary.p_value)} for the {primary.design} analysis that "
            "leads.")


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _interval(d: st.Difference) -> str:
    return "" if d.ci_low is None else f" (95% CI {d.ci_low:+.4f} to {d.ci_high:+.4f})"


def verdict(primary: Analysis, tost: Tost, power: dict, alpha: float, disagrees: str | None,
            warned: bool) -> dict:
    """The verdict dict: `outcome` one of better, worse, equivalent, inconclusive, not_enough_data, no_test."""
    out = {"text": "", "outcome": None, "significant": None, "test": None, "p_value": None,
           "design": primary.design, "n_trials": primary.n_trials, "margin": tost.margin,
           "tost_p_value": tost.p_value, "additional": None, "unit": power["unit"], "disagreement": disagrees}
    d = primary.difference
    if not primary.enough:
        need = "2 complete pairs" if primary.design == PAIRED else "at least 2 per arm"
        out.update(outcome="not_enough_data", text=(
            f"not enough trials: spectral norm has {primary.n_sn} completed trial(s) with a final validation "
            f"accuracy, baseline {primary.n_baseline}; a comparison needs {need}."))
        return out
    if primary.p_value is None:
        out.update(outcome="no_test", text=(
            "no test possible: every trial in each arm has the same final validation accuracy (zero variance); "
            f"observed difference SN − baseline = {d.estimate:+.4f}."))
        return out
    name = TEST_NAMES[primary.test]
    significant = primary.p_value < alpha
    basis = f"{name} over {primary.describe()}"
    out.update(significant=significant, test=primary.test, p_value=primary.p_value)
    if significant:
        better = d.estimate > 0
        out["outcome"] = "better" if better else "worse"
        text = (f"{out['outcome']}: spectral normalization gave {'higher' if better else 'lower'} final validation "
                f"accuracy than the baseline at α = {alpha:g} (p = {fmt_p(primary.p_value)}, {basis}): "
                f"SN − baseline = {d.estimate:+.4f}{_interval(d)}.")
    elif tost.p_value is not None and tost.p_value < alpha:
        out["outcome"] = "equivalent"
        text = (f"equivalent within ±{tost.margin:g}: SN − baseline = {d.estimate:+.4f}{_interval(d)}, TOST "
                f"p = {fmt_p(tost.p_value)} ({basis}; no significant difference, p = {fmt_p(primary.p_value)}).")
    else:
        out["outcome"] = "inconclusive"
        tost_p = "–" if tost.p_value is None else fmt_p(tost.p_value)
        text = (f"inconclusive: neither a significant difference (p = {fmt_p(primary.p_value)}) nor equivalence "
                f"within ±{tost.margin:g} (TOST p = {tost_p}), {basis}; SN − baseline = {d.estimate:+.4f}"
                f"{_interval(d)}.")
        block = power["min_effect"]
        if block["required_n"] is not None:
            out["additional"] = block["additional"]
            text += (f" About {block['additional']:,} more {power['unit']} ({block['required_n']:,} in all) would "
                     f"give 80% power to detect a difference of {tost.margin:g}.")
        elif block["standardized_effect"] is not None:
            text += f" Detecting {tost.margin:g} with 80% power would need more than {st.MAX_N:,} {power['unit']}."
    if disagrees:
        text += " Caution: " + disagrees
    if warned:
        text += " See the warnings: the arms may differ in more than the flag, so this is an association, not proof."
    out["text"] = text
    return out
