"""Renderings of a report dict: json (the documented contract), csv (every field as a dotted path), and the
human ones, table and markdown, which show the same rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

FORMATS = ("table", "json", "csv", "markdown")
PLOT_SUFFIXES = (".png", ".svg")  # the figure of consumers.report.plot


def _num(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(block: dict, digits: int = 4, signed: bool = False) -> str:
    if block["ci_low"] is None:
        return "–"
    return f"[{_num(block['ci_low'], digits, signed)}, {_num(block['ci_high'], digits, signed)}]"


def _p(test: dict) -> str:
    return "–" if test["p_value"] is None else f"{test['p_value']:.4g}"


def arm_rows(report: dict) -> list[tuple[str, str, str]]:
    """(label, spectral norm, baseline) rows of the per-arm summary."""
    sn, base = report["arms"]["spectral_norm"], report["arms"]["baseline"]

    def row(label: str, get) -> tuple[str, str, str]:
        return label, get(sn), get(base)

    acc, gap, dur = "final_val_accuracy", "train_val_gap", "duration_ms"
    return [
        row("trials completed / pruned / failed / running",
            lambda a: "{completed} / {pruned} / {failed} / {running}".format(**a["trials"])),
        row("final val accuracy: mean", lambda a: _num(a[acc]["mean"])),
        row("  95% CI of the mean", lambda a: _interval(a[acc])),
        row("  median", lambda a: _num(a[acc]["median"])),
        row("  std", lambda a: _num(a[acc]["std"])),
        row("  best", lambda a: _num(a["best"][acc])),
        row("train − val gap: mean", lambda a: _num(a[gap]["mean"], signed=True)),
        row("  95% CI", lambda a: _interval(a[gap], signed=True)),
        row("training time (ms): mean", lambda a: _num(a[dur]["mean"], 0)),
        ("pruned rate", *(_num(report["rates"]["pruned"][k], 3) for k in ("spectral_norm", "baseline"))),
        ("failed rate", *(_num(report["rates"]["failed"][k], 3) for k in ("spectral_norm", "baseline"))),
    ]


def _difference(d: dict) -> str:
    return f"{_num(d['estimate'], signed=True)} (95% CI {_interval(d, signed=True)})"


def _sigma_line(arm: str, block: dict) -> str:
    layers = ", ".join(f"{layer['layer']} {_num(layer['median'], 3)}/{_num(layer['max'], 3)}"
                       for layer in block["layers"])
    bound = block["lipschitz_bound"]
    return (f"  {arm}: σ at the last epoch, median/max per layer: {layers or '–'}; Lipschitz bound (product) "
            f"median {_num(bound['median'], 3)}, max {_num(bound['max'], 3)} ({block['trials_measured']} trials)")


def manipulation_lines(report: dict) -> list[str]:
    m = report["manipulation"]
    if m["passed"] is None:
        return ["manipulation check: no singular values recorded for the completed trials"]
    state = "passed" if m["passed"] else (
        f"FAILED ({m['sn_trials_over_tolerance']} SN trials above σ {m['tolerance']:g} on a wrapped layer, "
        f"{m['baseline_trials_all_at_most_one']} baseline trials with every σ ≤ 1)")
    return [f"manipulation check: {state}", _sigma_line("spectral norm", m["spectral_norm"]),
            _sigma_line("baseline", m["baseline"])]


def where_lines(report: dict) -> list[str]:
    w = report["where_it_helps"]
    tested = [e for e in w["parameters"] if e["p_value"] is not None]
    if not tested:
        return []
    lines = [f"where it helps (exploratory, {w['design']}, Holm-adjusted over {len(tested)} parameters):"]
    for e in sorted(tested, key=lambda e: e["p_holm"]):
        test = {"spearman": "Spearman ρ", "kruskal": "Kruskal–Wallis H", "interaction": "arm × parameter slope"}
        lines.append(f"  {e['hyperparam']} ({e['scale']}): {test[e['test']]} = {_num(e['statistic'], 3)}, "
                     f"p = {e['p_value']:.3g}, Holm p = {e['p_holm']:.3g}")
        if e["hyperparam"] == w["most_related"] and e["hyperparam"] in w["related"]:
            lines += [f"    {b['label']}: {_difference(b)}, n = {b['n']}" for b in e["buckets"]]
    return lines


def finding_lines(report: dict) -> list[str]:
    """The comparison's figures, one finding a line."""
    d, t, e = report["difference"], report["tests"], report["effect_sizes"]
    paired, primary, subset = t["paired"], report["primary"], report["subset"]
    lines = [
        f"leading analysis: {primary['design']} over {primary['n_trials']:,} trials; difference SN − baseline: "
        f"{_difference(d)}",
        f"Welch's t = {_num(t['welch_t']['statistic'], 3)}, p = {_p(t['welch_t'])}; "
        f"Mann–Whitney U = {_num(t['mann_whitney_u']['statistic'], 1)}, p = {_p(t['mann_whitney_u'])}",
        f"paired ({paired['n_pairs']} complete of {paired['n_linked_pairs']} linked pairs): "
        f"t = {_num(paired['t_test']['statistic'], 3)}, p = {_p(paired['t_test'])}; "
        f"Wilcoxon W = {_num(paired['wilcoxon_signed_rank']['statistic'], 1)}, "
        f"p = {_p(paired['wilcoxon_signed_rank'])}",
    ]
    if subset["design"]:
        lines.append(f"subset: the {subset['design']} analysis over {subset['n_trials']:,} trials gives "
                     f"{_difference(subset['difference'])}, p = {_num(subset['p_value'], 4)}")
    lines.append(f"effect sizes: Hedges' g = {_num(e['hedges_g'], 3)}, Cliff's delta = {_num(e['cliffs_delta'], 3)}")
    q = report["equivalence"]
    aso, bayes = q["aso"], q["bayes_signed_rank"]
    lines.append(f"equivalence within ±{q['margin']:g}: TOST ({q['tost']['design']}) p = {_p(q['tost'])}; "
                 f"ASO ε_min = {_num(aso['epsilon_min'], 3)} (< 0.5: SN almost stochastically better; > 0.5: "
                 "baseline)")
    if bayes["p_sn_better"] is not None:
        lines.append(f"Bayesian signed-rank over {bayes['n_pairs']} pairs, ROPE ±{bayes['rope']:g}: P(SN better) = "
                     f"{bayes['p_sn_better']:.3f}, P(equivalent) = {bayes['p_equivalent']:.3f}, P(baseline better) = "
                     f"{bayes['p_baseline_better']:.3f}")
    stab, conv = report["stability"], report["convergence"]
    vr, bf = stab["variance_ratio"], stab["brown_forsythe"]
    lines.append(f"stability: variance ratio SN / baseline = {_num(vr['ratio'], 3)} (95% CI {_interval(vr, 3)}), "
                 f"Brown–Forsythe p = {_p(bf)}; paired Pitman–Morgan p = {_p(stab['paired']['pitman_morgan'])}")
    lines.append(f"convergence (epochs to 95% of final val accuracy): SN {_num(conv['spectral_norm']['mean'], 2)}, "
                 f"baseline {_num(conv['baseline']['mean'], 2)}, difference {_difference(conv['difference'])}")
    ratio = report["training_time"]["ratio"]
    lines.append(f"training time SN / baseline ({ratio['design']}, geometric mean): {_num(ratio['estimate'], 3)} "
                 f"(95% CI {_interval(ratio, 3)})")
    strata = report["strata"]
    if len(strata["items"]) > 1:
        lines.append(f"strata ({strata['design']}, search × dataset, Holm-adjusted):")
        lines += [f"  {i['model_run_id']} / {i['dataset']}: {_difference(i['difference'])}, Holm p = "
                  f"{_num(i['p_holm'], 4)}" for i in strata["items"]]
        pooled = strata["pooled"]
        lines.append(f"  pooled (inverse-variance): {_difference(pooled)}, I² = {_num(pooled['i_squared'], 2)}")
    power = report["power"]
    block = power["min_effect"]
    if block["standardized_effect"] is not None:
        now = "–" if block["power"] is None else f"{block['power']:.0%}"
        need = "–" if block["required_n"] is None else f"{block['required_n']:,} {power['unit']}"
        lines.append(f"power to detect the minimum effect ±{report['min_effect']:g}: {now} now; 80% needs {need}")
    return lines + where_lines(report) + manipulation_lines(report)


def render_table(report: dict) -> str:
    rows = [("", "spectral norm", "baseline"), *arm_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    out = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in rows]
    out += ["", *finding_lines(report), ""]
    out += [f"warning: {w}" for w in report["warnings"]]
    out.append(f"verdict: {report['verdict']['text']}")
    return "\n".join(out) + "\n"


def render_markdown(report: dict) -> str:
    f = report["filters"]
    scope = ", ".join(f"{k} = `{v}`" for k, v in f.items() if v) or "all searches"
    out = [f"## Spectral norm vs baseline ({scope})", "", "| | spectral norm | baseline |", "|---|---:|---:|"]
    out += [f"| {a.strip()} | {b} | {c} |" for a, b, c in arm_rows(report)]
    out += ["", *(f"- {line}" for line in finding_lines(report))]
    out += [f"- **warning:** {w}" for w in report["warnings"]]
    out += ["", f"**Verdict:** {report['verdict']['text']}"]
    return "\n".join(out) + "\n"


def flatten(obj, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every leaf of the report as (dotted.path, value); list items by index."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from flatten(value, f"{prefix}{index}.")
    else:
        yield prefix[:-1], obj


def render_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("field", "value"))
    for key, value in flatten(report):
        writer.writerow((key, "" if value is None else json.dumps(value) if isinstance(value, bool) else value))
    return buffer.getvalue()


def render_json(report: dict) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


RENDERERS = {"table": render_table, "json": render_json, "csv": render_csv, "markdown": render_markdown}
