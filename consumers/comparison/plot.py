"""The report's figure: per-arm distribution of final validation accuracy, and mean learning curves with 95%
bands. Rendered with matplotlib's Agg backend (no display needed); the file type follows the extension."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from consumers.comparison.render import PLOT_SUFFIXES
from consumers.comparison.report import ARMS, ComparisonData

COLORS = {"spectral_norm": "tab:blue", "baseline": "tab:orange"}
LABELS = {"spectral_norm": "spectral norm", "baseline": "baseline"}


def plot_report(data: ComparisonData, report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise ValueError(f"plot file must end in {' or '.join(PLOT_SUFFIXES)}: {path}")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    values = {name: data.completed_values(flag) for name, flag in zip(ARMS, (True, False), strict=True)}
    positions = [i + 1 for i, name in enumerate(ARMS) if values[name]]
    if positions:
        left.boxplot([values[ARMS[p - 1]] for p in positions], positions=positions, widths=0.5, showfliers=False)
    rng = np.random.default_rng(0)
    for i, name in enumerate(ARMS, start=1):
        x = i + rng.uniform(-0.12, 0.12, len(values[name]))
        left.scatter(x, values[name], s=12, alpha=0.6, color=COLORS[name])
    left.set_xticks([1, 2], [f"{LABELS[n]}\n(n = {len(values[n])})" for n in ARMS])
    left.set_ylabel("final validation accuracy")
    left.set_title("completed trials")
    for name in ARMS:
        points = [p for p in report["curves"][name] if p["mean"] is not None]
        if not points:
            continue
        epochs = [p["epoch"] for p in points]
        right.plot(epochs, [p["mean"] for p in points], color=COLORS[name], label=LABELS[name])
        banded = [p for p in points if p["ci_low"] is not None]
        right.fill_between([p["epoch"] for p in banded], [p["ci_low"] for p in banded],
                           [p["ci_high"] for p in banded], color=COLORS[name], alpha=0.2)
    right.set_xlabel("epoch")
    right.set_ylabel("validation accuracy (mean, 95% band)")
    right.set_title("learning curves")
    if right.lines:
        right.legend()
    fig.suptitle(textwrap.fill(report["verdict"]["text"].split(". ")[0], 150), fontsize=9)
    fig.savefig(path)
    plt.close(fig)
    return path
