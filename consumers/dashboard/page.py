"""The server-rendered page: everything readable without JavaScript; dashboard.js keeps it live."""

from __future__ import annotations

import json
from html import escape

ARMS = (("spectral_norm", True, "Spectral norm"), ("baseline", False, "Baseline"))
STATUSES = ("running", "completed", "failed", "pruned")
# Verdict figures shown, as dotted paths into the report JSON (`sntrack report --format json`).
VERDICT_FIELDS = (
    ("difference SN − baseline", "difference.estimate"),
    ("  95% CI low", "difference.ci_low"),
    ("  95% CI high", "difference.ci_high"),
    ("Welch t p", "tests.welch_t.p_value"),
    ("Mann–Whitney U p", "tests.mann_whitney_u.p_value"),
    ("complete pairs", "tests.paired.n_pairs"),
    ("paired t p", "tests.paired.t_test.p_value"),
    ("Wilcoxon signed-rank p", "tests.paired.wilcoxon_signed_rank.p_value"),
    ("Hedges' g", "effect_sizes.hedges_g"),
    ("Cliff's delta", "effect_sizes.cliffs_delta"),
    ("TOST p (equivalence)", "equivalence.tost.p_value"),
    ("power at min effect", "power.min_effect.power"),
    ("more trials for 80% power", "power.min_effect.additional"),
)
ARM_FIELDS = (
    ("completed", "trials.completed"), ("running", "trials.running"), ("failed", "trials.failed"),
    ("pruned", "trials.pruned"), ("mean val accuracy", "final_val_accuracy.mean"),
    ("  95% CI low", "final_val_accuracy.ci_low"), ("  95% CI high", "final_val_accuracy.ci_high"),
    ("median", "final_val_accuracy.median"), ("std", "final_val_accuracy.std"),
    ("mean duration ms", "duration_ms.mean"),
)


def lookup(report: dict | None, path: str):
    value = report
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 and value else f"{value:.4f}"


def _figure(report: dict | None, path: str) -> str:
    value = lookup(report, path)
    raw = "" if value is None else json.dumps(value)
    return f'<td data-path="{escape(path)}" data-value="{escape(raw)}">{escape(fmt(value))}</td>'


def verdict_html(report: dict | None) -> str:
    verdict = (report or {}).get("verdict") or {}
    rows = "".join(f"<tr><th scope=row>{escape(label)}</th>{_figure(report, path)}</tr>"
                   for label, path in VERDICT_FIELDS)
    arms = "".join(
        f"<tr><th scope=row>{escape(label)}</th>"
        + "".join(_figure(report, f"arms.{arm}.{path}") for arm, _, _ in ARMS) + "</tr>"
        for label, path in ARM_FIELDS)
    warnings = "".join(f"<li>{escape(w)}</li>" for w in (report or {}).get("warnings", []))
    return (f'<p class="outcome" data-path="verdict.outcome">{escape(str(verdict.get("outcome", "no data yet")))}</p>'
            f'<p data-path="verdict.text">{escape(str(verdict.get("text", "")))}</p>'
            '<div class="tables"><table class="figures"><caption>Per arm</caption><thead><tr><th></th>'
            '<th scope=col>Spectral norm</th><th scope=col>Baseline</th></tr></thead>'
            f'<tbody>{arms}</tbody></table>'
            f'<table class="figures"><caption>Difference and tests</caption><tbody>{rows}</tbody></table></div>'
            f'<ul class="warnings">{warnings}</ul>')


def _hyperparams(row: dict) -> str:
    shown = [(k, v) for k, v in sorted(row["hyperparams"].items()) if k != "spectral_norm"][:5]
    return ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in shown)


def _mlflow(row: dict, mlflow_url: str | None) -> str:
    run = row["mlflow_run_id"]
    if not run:
        return "–"
    if mlflow_url and row["mlflow_experiment_id"]:
        href = f"{mlflow_url.rstrip('/')}/#/experiments/{row['mlflow_experiment_id']}/runs/{run}"
        return f'<a href="{escape(href)}">{escape(run[:8])}</a>'
    return escape(run[:8])


def trial_html(row: dict, mlflow_url: str | None) -> str:
    accuracy = row["final_val_accuracy"] if row["final_val_accuracy"] is not None else row["last_val_accuracy"]
    duration = "–" if row["duration_ms"] is None else f"{row['duration_ms'] / 1000:.1f} s"
    return (f'<tr id="trial-{escape(row["id"])}" data-trial="{escape(row["id"])}" data-status="{row["status"]}" '
            f'data-study="{escape(row["model_run_id"])}" data-dataset="{escape(row["dataset"] or "")}" '
            f'data-epoch="{"" if row["last_epoch"] is None else row["last_epoch"]}">'
            f'<th scope=row><a class="open" href="api/trials/{escape(row["id"])}/curve">{escape(row["id"])}</a></th>'
            f'<td>{escape(row["model_run_id"])}</td><td>{escape(row["dataset"] or "–")}</td>'
            f'<td class="status {row["status"]}">{row["status"]}</td><td class="hp">{escape(_hyperparams(row))}</td>'
            f'<td class="epoch">{"–" if row["last_epoch"] is None else row["last_epoch"]}</td>'
            f'<td class="acc">{fmt(accuracy)}</td><td>{duration}</td><td>{_mlflow(row, mlflow_url)}</td></tr>')


def _matches(row: dict, filters: dict[str, str]) -> bool:
    return all(not want or row[key] == want for key, want in (
        ("model_run_id", filters.get("study")), ("dataset", filters.get("dataset")),
        ("status", filters.get("status"))))


def trials_html(rows: list[dict], filters: dict[str, str], mlflow_url: str | None) -> str:
    head = ("<thead><tr><th scope=col>trial</th><th scope=col>study</th><th scope=col>dataset</th>"
            "<th scope=col>status</th><th scope=col>hyper-parameters</th><th scope=col>epoch</th>"
            "<th scope=col>val accuracy</th><th scope=col>duration</th><th scope=col>MLflow</th></tr></thead>")
    out = []
    for arm, flag, label in ARMS:
        body = "".join(trial_html(r, mlflow_url) for r in rows if r["spectral_norm"] is flag and _matches(r, filters))
        out.append(f'<section class="arm" aria-labelledby="h-{arm}"><h3 id="h-{arm}">{label}</h3>'
                   f'<div class="scroll"><table id="trials-{arm}" class="trials">{head}<tbody>{body}</tbody></table>'
                   '</div></section>')
    return "".join(out)


def _options(values: list[str], chosen: str | None) -> str:
    return "".join(f'<option value="{escape(v)}"{" selected" if v == chosen else ""}>{escape(v)}</option>'
                   for v in ["", *values])


def activity_html(rows: list[dict]) -> str:
    events = sorted(((r["finished_at"], f"{r['id']} {r['status']}") for r in rows if r["finished_at"]),
                    reverse=True)[:10]
    events += sorted(((r["started_at"], f"{r['id']} started") for r in rows if r["started_at"]), reverse=True)[:10]
    events.sort(reverse=True)
    return "".join(f"<li><time>{escape(str(at)[11:19])}</time> {escape(text)}</li>" for at, text in events[:15])


def queues_html(queues: list[dict] | None) -> str:
    """Consumer lag (messages waiting in each consumer's queue) and dead letters (waiting in each `.dlq`)."""
    return "".join(
        f'<tr class="{"dead" if q["name"].endswith(".dlq") and q["messages"] else ""}"><th scope=row>'
        f'{escape(q["name"])}</th><td>{q["messages"]}</td><td>{q["consumers"]}</td></tr>' for q in queues or [])


def render_page(rows: list[dict], report: dict | None, queues: list[dict] | None, filters: dict[str, str],
                mlflow_url: str | None) -> str:
    studies = sorted({r["model_run_id"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows if r["dataset"]})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>sntrack dashboard</title><link rel="icon" href="data:,">
<link rel="stylesheet" href="static/vendor/uplot/uPlot.min.css"><link rel="stylesheet" href="static/dashboard.css">
</head><body>
<header><h1>sntrack: spectral norm vs baseline</h1>
<p id="live" role="status" aria-live="polite">static page</p></header>
<main>
<section id="verdict" aria-labelledby="h-verdict"><h2 id="h-verdict">Verdict</h2>
<div id="verdict-body">{verdict_html(report)}</div>
<figure><svg id="arms-chart" role="img" aria-label="final validation accuracy per arm, pairs joined"></svg>
<figcaption>Final validation accuracy of completed trials per arm; lines join pairs.</figcaption></figure></section>
<section id="trials" aria-labelledby="h-trials"><h2 id="h-trials">Trials by constraint</h2>
<form id="filters" method="get">
<label>study <select name="study">{_options(studies, filters.get("study"))}</select></label>
<label>dataset <select name="dataset">{_options(datasets, filters.get("dataset"))}</select></label>
<label>status <select name="status">{_options(list(STATUSES), filters.get("status"))}</select></label>
<button type="submit">filter</button></form>
<div id="arms">{trials_html(rows, filters, mlflow_url)}</div></section>
<section id="detail" aria-labelledby="h-detail" hidden><h2 id="h-detail">Trial <span id="detail-id"></span></h2>
<div id="curve-chart"></div><div id="sigma-chart"></div></section>
<section id="activity" aria-labelledby="h-activity"><h2 id="h-activity">Recent activity</h2>
<ul id="activity-list">{activity_html(rows)}</ul>
<div class="scroll">
<table id="queues"><caption>Queues: consumer lag and dead letters (RabbitMQ, sampled every 5 s)</caption>
<thead><tr><th scope=col>queue</th><th scope=col>waiting</th><th scope=col>consumers</th></tr></thead>
<tbody>{queues_html(queues)}</tbody></table></div></section>
</main>
<script src="static/vendor/uplot/uPlot.iife.min.js"></script><script src="static/dashboard.js"></script>
</body></html>
"""
