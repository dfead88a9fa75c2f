"""Renderings of a report dict: json (the documented contract), csv (every field as a dotted path), and the
human ones, table and markdown, which show the same rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

FORMATS = ("table", "json", "csv", "markdown")
PLOT_SUFFIXES = (".png", ".svg")  # the figure of consumers.comparison.plot


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


def finding_lines(report: dict) -> list[str]:
    """The comparison's figures, one finding a line."""
    d, t, e = report["difference"], report["tests"], report["effect_sizes"]
    paired = t["paired"]
    lines = [
        f"difference SN − baseline: {_num(d['estimate'], signed=True)} (95% CI {_interval(d, signed=True)}, "
        f"{report['power']['design']})",
        f"Welch's t = {_num(t['welch_t']['statistic'], 3)}, p = {_p(t['welch_t'])}; "
        f"Mann–Whitney U = {_num(t['mann_whitney_u']['statistic'], 1)}, p = {_p(t['mann_whitney_u'])}",
        f"paired ({paired['n_pairs']} complete of {paired['n_linked_pairs']} linked pairs): "
        f"t = {_num(paired['t_test']['statistic'], 3)}, p = {_p(paired['t_test'])}; "
        f"Wilcoxon W = {_num(paired['wilcoxon_signed_rank']['statistic'], 1)}, "
        f"p = {_p(paired['wilcoxon_signed_rank'])}",
        f"effect sizes: Hedges' g = {_num(e['hedges_g'], 3)}, Cliff's delta = {_num(e['cliffs_delta'], 3)}",
    ]
    overhead = report["training_time"]["overhead"]
    lines.append("SN training-time overhead: " + ("–" if overhead is None else f"{overhead:+.1%}"))
    power = report["power"]
    for label, block in (("observed difference", power["observed"]), ("minimum effect", power["min_effect"])):
        if block["standardized_effect"] is not None:
            now = "–" if block["power"] is None else f"{block['power']:.0%}"
            need = "–" if block["required_n"] is None else f"{block['required_n']} {power['unit']}"
            lines.append(f"power for the {label} ({_num(block['effect'], signed=True)}): {now} now; "
                         f"80% needs {need}")
    return lines


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
