"""The report's figure, four panels with one colour per arm throughout: final validation accuracy per arm (box,
points, and a slope line between paired twins); mean learning curves by epoch and by wall-clock time (95% bands
clipped to [0, 1], drawn only where n ≥ 3); and SN − baseline against the most related hyper-parameter. Rendered
with matplotlib's Agg backend; the file type follows the extension."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from consumers.report.render import PLOT_SUFFIXES
from consumers.report.report import ARMS, complete_pairs
from consumers.report.snapshot import ComparisonData

COLORS = {"spectral_norm": "tab:blue", "baseline": "tab:orange"}
LABELS = {"spectral_norm": "spectral norm", "baseline": "baseline"}
MIN_BAND_N = 3  # a t-band from fewer points is wider than the metric's range and means little


def _title(report: dict) -> str:
    f, primary = report["filters"], report["primary"]
    scope = f"study {f['model_run_id'] or 'all searches'}, dataset {f['dataset'] or 'all'}"
    return (f"Spectral norm vs baseline — {scope}; {primary['design']} analysis, n = {primary['n_trials']:,} trials\n"
            f"verdict: {report['verdict']['outcome'] or '–'}")


def _distribution(ax, data: ComparisonData, report: dict) -> None:
    values = {name: data.completed_values(flag) for name, flag in zip(ARMS, (True, False), strict=True)}
    for i, name in enumerate(ARMS, start=1):
        if values[name]:
            color = COLORS[name]
            ax.boxplot([values[name]], positions=[i], widths=0.5, showfliers=False, patch_artist=False,
                       boxprops={"color": color}, whiskerprops={"color": color}, capprops={"color": color},
                       medianprops={"color": color, "linewidth": 2})
    pairs, _ = complete_pairs(data.trials)
    for sn, base in pairs:
        ax.plot([1, 2], [sn.val, base.val], color="grey", alpha=0.25, linewidth=0.8)
    rng = np.random.default_rng(0)
    for i, name in enumerate(ARMS, start=1):
        x = i + rng.uniform(-0.08, 0.08, len(values[name]))
        ax.scatter(x, values[name], s=10, alpha=0.6, color=COLORS[name], zorder=3)
    ax.set_xticks([1, 2], [f"{LABELS[n]}\n(n = {len(values[n])})" for n in ARMS])
    ax.set_ylabel("final validation accuracy")
    ax.set_title(f"completed trials ({len(pairs)} paired twins joined)", fontsize=9)


def _curves(ax, report: dict, x_key: str, xlabel: str) -> None:
    for name in ARMS:
        points = [p for p in report["curves"][name] if p["mean"] is not None and p[x_key] is not None]
        if not points:
            continue
        ax.plot([p[x_key] for p in points], [p["mean"] for p in points], color=COLORS[name], label=LABELS[name])
        banded = [p for p in points if p["n"] >= MIN_BAND_N and p["ci_low"] is not None]
        ax.fill_between([p[x_key] for p in banded], [max(0.0, p["ci_low"]) for p in banded],
                        [min(1.0, p["ci_high"]) for p in banded], color=COLORS[name], alpha=0.2)
    ax.set_xlabel(xlabel)
    if x_key == "epoch":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation accuracy (mean, 95% band)")
    ax.set_title(f"learning curves by {xlabel.split(' (')[0]}", fontsize=9)
    if ax.lines:
        ax.legend(fontsize=8)


def _effect(ax, report: dict) -> None:
    where = report["where_it_helps"]
    entry = next((e for e in where["parameters"] if e["hyperparam"] == where["most_related"]), None)
    if entry is None:
        ax.text(0.5, 0.5, "no hyper-parameter to relate the effect to", ha="center", va="center", fontsize=8)
        ax.set_axis_off()
        return
    buckets = [b for b in entry["buckets"] if b["estimate"] is not None]
    x = np.arange(len(buckets))
    means = np.asarray([b["estimate"] for b in buckets])
    low = np.asarray([b["estimate"] if b["ci_low"] is None else b["ci_low"] for b in buckets])
    high = np.asarray([b["estimate"] if b["ci_high"] is None else b["ci_high"] for b in buckets])
    ax.errorbar(x, means, yerr=[means - low, high - means], fmt="o", color=COLORS["spectral_norm"], capsize=3)
    ax.axhline(0, color="grey", linewidth=0.8)
    margin = report["min_effect"]
    ax.axhspan(-margin, margin, color="grey", alpha=0.1, label=f"±{margin:g} (equivalence)")
    ax.set_xticks(x, [f"{b['label']}\nn = {b['n']}" for b in buckets], fontsize=7)
    ax.set_xlabel(f"{entry['hyperparam']} (Holm p = {entry['p_holm']:.3g}; exploratory)")
    ax.set_ylabel("SN − baseline (95% CI)")
    ax.set_title("where it helps", fontsize=9)
    ax.legend(fontsize=8)


def plot_report(data: ComparisonData, report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"plot file must end in {' or '.join(PLOT_SUFFIXES)}: {path}")
    fig, axes = plt.subplots(2, 2, figsize=(12, 9), layout="constrained")
    _distribution(axes[0][0], data, report)
    _effect(axes[0][1], report)
    _curves(axes[1][0], report, "epoch", "epoch")
    _curves(axes[1][1], report, "elapsed_s", "wall-clock time (s since the trial started)")
    fig.suptitle(_title(report), fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return path
