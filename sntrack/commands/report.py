"""sntrack report — is spectral normalization better than the baseline, by how much, and how sure are we."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg

from common.errors import ConfigurationError
from consumers.report.lazy_stats import SPECIAL_FUNCTIONS, import_in_background
from consumers.report.render import FORMATS, PLOT_SUFFIXES, RENDERERS
from sntrack.pools import read_pool
from sntrack.settings import Settings

# scipy.stats only where an exact small-sample test or Kolmogorov–Smirnov needs it (consumers.report.special_stats)
STATISTICS = ("consumers.report.report", SPECIAL_FUNCTIONS)
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")  # what OpenBLAS reads, in its order
# From this many trials the build computes its hyper-parameter sections and equivalence tests in a forked worker on
# the second core (consumers.report.forked); below it, forking costs more than it saves.
FORK_MIN_TRIALS = 5_000
# Connections beside the one that reads the trials (consumers.report.snapshot.load): one reads their
# hyper-parameters and σ meanwhile, one the learning curves where they are shown.
HELPERS, CURVE_HELPERS = 1, 1
MIN_EFFECT = 0.01  # the same default as consumers.report.report.MIN_EFFECT (imported lazily, with numpy)
EXAMPLES = """examples:
  sntrack report --run demo-study
  sntrack report --run demo-study --min-effect 0.005 --plot demo.png
  sntrack report --dataset digits --format json > report.json
  sntrack replay trials --until 2026-11-23T17:00:00Z --into monday && sntrack report --schema monday
"""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number (an absolute accuracy difference): {text!r}")
    return value


def check_plot_path(text: str) -> None:
    """The figure's path, checked before any work: a known suffix, in a folder that exists and can be written."""
    if not text.lower().endswith(PLOT_SUFFIXES):
        raise ConfigurationError(f"--plot: the file must end in {' or '.join(PLOT_SUFFIXES)}: {text!r}")
    folder = Path(text).parent
    if not folder.is_dir():
        raise ConfigurationError(f"--plot: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigurationError(f"--plot: the folder {str(folder)!r} is not writable")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="spectral norm vs baseline: statistics, power and a plain verdict",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Compare the final validation accuracy of completed trials with spectral normalization against "
        "the baseline. The verdict is better, worse, equivalent within ±min-effect (TOST) or inconclusive\n"
        "(with how many more trials 80% power needs), and rests on the paired analysis only when most completed\n"
        "trials are in complete pairs. Beside it: Welch, Mann-Whitney, paired t and Wilcoxon, ASO's epsilon_min,\n"
        "the Bayesian signed-rank ROPE probabilities, a check that spectral norm took effect (per-layer sigma),\n"
        "where it helps (exploratory), stability, convergence, training time and strata. JSON output is\n"
        "documented in docs/report.md.")
    parser.add_argument("--run", dest="model_run_id", metavar="ID",
                        help="only this search (model_run_id); default: all searches")
    parser.add_argument("--dataset", metavar="D", help="only trials on this dataset (e.g. digits)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")
    parser.add_argument("--plot", metavar="FILE",
                        help="also draw the figure to FILE.png or FILE.svg (its folder must exist)")
    parser.add_argument("--min-effect", type=_positive, metavar="X", default=MIN_EFFECT,
                        help="the smallest absolute accuracy difference that matters (default: %(default)s): the "
                        "equivalence margin, and the effect power and 'n more' are computed for")
    parser.add_argument("--schema", metavar="SCHEMA",
                        help="report on the past state that `sntrack replay trials --until TIME --into SCHEMA` "
                        "wrote, not on the live tables (summaries from its trials; no journal comparison)")
    parser.set_defaults(run=_report, exit_early=True)  # sntrack.cli._exit_now


async def _use_schema(conn, schema: str) -> None:
    """Put `schema`, which must hold a past state of the trials projection, first on the connection's search_path:
    the report's reads of trials and trial_metrics go there, nothing else does, and nothing is written."""
    from sntrack.commands.replay import RESERVED, SCHEMA_NAME  # with the consumers' registry: only for --schema

    if not SCHEMA_NAME.fullmatch(schema) or RESERVED.fullmatch(schema):  # what `replay --into` accepts, no more
        raise ConfigurationError(f"--schema {schema!r} is not a schema `sntrack replay --into` writes (lower case "
                                 "letters, digits, _, at most 63; not public, pg_* or sntrack_*)")
    found = await conn.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = $1 "
                             "AND table_name IN ('trials', 'trial_metrics', 'applied_events')", schema)
    if len(found) < 3:
        raise ConfigurationError(f"--schema {schema!r} holds no past state of trials; write one with `sntrack replay "
                                 f"trials --until TIME --into {schema}`")
    if not await conn.fetchval(CURRENT, schema):
        raise ConfigurationError(f"--schema {schema!r} was written by an older sntrack, without columns the report "
                                 "reads; write a new past state with `sntrack replay trials --until TIME --into "
                                 "NEW_SCHEMA`")
    path = await conn.fetchval("SELECT current_setting('search_path')")
    await conn.execute("SELECT set_config('search_path', $1, false)", f"{_quoted(schema)}, {path}")


# A past state holds the columns the report reads: those of the newest migration that added any (014).
CURRENT = ("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE table_schema = $1 "
           "AND table_name = 'trials' AND column_name = 'last_sigmas_text')")


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


async def _report(args: argparse.Namespace, settings: Settings) -> int:
    if sys.stdout is None:  # started with its standard output closed (`>&-`): the report would go nowhere
        raise ConfigurationError("the standard output is closed: redirect it, e.g. sntrack report > report.txt")
    if args.plot:
        check_plot_path(args.plot)
    from consumers.report.snapshot import UnknownScope, load

    curves = args.format in ("json", "csv") or bool(args.plot)  # the learning curves: only these show them
    size = 1 + HELPERS + (CURVE_HELPERS if curves else 0)
    pool = await read_pool(settings, min_size=1, max_size=size)
    statistics = None
    try:
        try:
            async with AsyncExitStack() as stack:
                stack.push_async_callback(pool.close)  # the last to run: once every connection is released
                connections = await _connections(pool, stack, size)
                # The read needs no numpy: the statistics' modules import in a thread while the server works on it
                # (started once connected: the handshake's round trips would each wait for the interpreter), and
                # their first use waits for them. matplotlib only for --plot.
                # OpenBLAS starts a thread per core at numpy's import, and they spin: on 2 cores they took about
                # 0.15 s of CPU from the read and the server. The report's linear algebra is a few 4×4 solves. A
                # user's own setting wins.
                if not any(name in os.environ for name in BLAS_THREADS):
                    os.environ["OPENBLAS_NUM_THREADS"] = "1"
                statistics = import_in_background(*STATISTICS)
                if args.schema is not None:
                    for each in connections:
                        await _use_schema(each, args.schema)
                data = await load(connections[0], args.model_run_id, args.dataset, live=args.schema is None,
                                  curves=curves, helpers=connections[1:])
        except UnknownScope as exc:
            raise ConfigurationError(str(exc)) from None
        # The build needs the statistics, and forks its worker only where no other thread runs: the import thread,
        # or asyncio's executor (left from resolving a host name).
        statistics.join()
        await asyncio.get_running_loop().shutdown_default_executor()
        return _build_and_print(args, data)
    finally:
        if statistics is not None:
            statistics.join()  # not torn down half-imported at exit, whatever happened


async def _connections(pool: asyncpg.Pool, stack: AsyncExitStack, size: int) -> list[asyncpg.Connection]:
    """The pool's first connection, and of the `size - 1` others as many as can be opened, connected at once. The
    others only read beside the first: one refused for any reason (the login's or the server's connection limit, a
    pooler's, a reset) leaves its read to the first, in turn
    (tests/test_comparison.py::test_a_login_allowed_one_connection_gets_the_same_report,
    tests/test_comparison.py::test_a_report_whose_second_connection_fails_reads_on_the_first). The first is never
    given up: a server frees a closed connection's slot only when its backend has exited, moments later, so a
    second try at the limit could find no slot at all."""
    first = await stack.enter_async_context(pool.acquire())

    async def another() -> asyncpg.Connection | None:
        try:
            return await stack.enter_async_context(pool.acquire())
        except Exception:  # noqa: BLE001 - not opened: what this one would read, the first reads in turn
            return None
    more = await asyncio.gather(*(another() for _ in range(size - 1)))
    return [first, *(each for each in more if each is not None)]


def _build_and_print(args: argparse.Namespace, data) -> int:
    # The loaded records live until the process ends: frozen, the cyclic GC stops rescanning them while the
    # statistics allocate (build over 40k pairs: 1.6 s before, 1.0 s frozen, in one run on this shared machine).
    gc.freeze()
    from consumers.report.report import build_report

    report = build_report(data, min_effect=args.min_effect, fork=len(data.trials) >= FORK_MIN_TRIALS)
    args.loaded = data  # freed by the process's end (exit_early), not object by object when this returns
    sys.stdout.write(RENDERERS[args.format](report))
    if args.plot:
        from consumers.report.plot import plot_report

        print(f"wrote {plot_report(data, report, args.plot)}", file=sys.stderr)
    return 0
