"""sntrack report — is spectral normalization better than the baseline, by how much, and how sure are we."""

from __future__ import annotations

import argparse
import sys

from consumers.comparison.render import FORMATS, PLOT_SUFFIXES, RENDERERS
from consumers.persistence import create_pool
from sntrack.settings import Settings


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number (an absolute accuracy difference): {text!r}")
    return value


def _plot_file(text: str) -> str:
    if not text.lower().endswith(PLOT_SUFFIXES):
        raise argparse.ArgumentTypeError(f"the plot file must end in {' or '.join(PLOT_SUFFIXES)}: {text!r}")
    return text


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="spectral norm vs baseline: statistics, power and a plain verdict",
        description="Compare the final validation accuracy of completed trials with spectral normalization against "
        "the baseline: per-arm summaries, the difference with its 95% CI, Welch's t and Mann-Whitney U (paired "
        "t and Wilcoxon signed-rank over complete pairs), effect sizes, train-val gap, training-time overhead, "
        "pruning and confounding warnings, and how many more trials 80% power needs. JSON output is documented "
        "in docs/report.md.")
    parser.add_argument("--run", dest="model_run_id", metavar="ID",
                        help="only this search (model_run_id); default: all searches")
    parser.add_argument("--dataset", metavar="D", help="only trials on this dataset")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--plot", type=_plot_file, metavar="FILE", help="also draw the figure to FILE.png or FILE.svg")
    parser.add_argument("--min-effect", type=_positive, metavar="X",
                        help="an absolute accuracy difference worth detecting (e.g. 0.005): the report says how many "
                        "trials 80%% power to detect it needs")
    parser.set_defaults(run=_report)


async def _report(args: argparse.Namespace, settings: Settings) -> int:
    # scipy and matplotlib load here, not when `sntrack` builds its parser for another command.
    from consumers.comparison.plot import plot_report
    from consumers.comparison.report import build_report, load

    pool = await create_pool(settings.database_url, max_size=1)
    try:
        async with pool.acquire() as conn:
            data = await load(conn, args.model_run_id, args.dataset)
    finally:
        await pool.close()
    report = build_report(data, min_effect=args.min_effect)
    sys.stdout.write(RENDERERS[args.format](report))
    if args.plot:
        print(f"wrote {plot_report(data, report, args.plot)}", file=sys.stderr)
    return 0
