"""`sntrack report` over 100,000 trials with 30 epochs of curves each (target: ≤ 1 s end to end), beside the same
statistics computed from data already in memory, measured in the same run on the same scratch database.

The scratch database is filled by SQL (generate_series: paired twins with shared hyper-parameters, 85% completed,
a learning curve per trial with per-layer singular values, sn_comparison derived from the trials), so this measures
the report, not the pipeline. Figures: the command as a user runs it (a fresh `python -m sntrack report` process),
the same in process (connect, load, build, render), build alone from loaded data (the baseline), and where the time
goes: load as the command runs it (the curves read on side connections meanwhile) and on one connection, and each
query alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import asyncpg

from common.postgres import create_database, drop_database
from common.urls import with_path
from consumers.persistence import migrate, migration_files
from consumers.report import queries
from consumers.report.queries import COMPARISON_COLUMNS, COMPARISON_FROM_TRIALS
from consumers.report.render import render_table
from consumers.report.report import build_report
from consumers.report.snapshot import load
from sntrack.commands.report import CURVE_HELPERS, HELPERS

TARGET_S = 1.0
EPOCHS = 30
REPEATS = 3
CLI_REPEATS = 5  # the figure the target is judged on: a median of more runs of a noisy fresh process

FILL_TRIALS = """
INSERT INTO trials (id, model_run_id, spectral_norm, status, hyperparams, metrics, dataset, model, epochs,
                    duration_ms, paired_with, last_seq, started_at, finished_at, inserted_at, updated_at)
SELECT 'bench-' || lpad((2 * p + sn::int)::text, 7, '0'), 'search-' || lpad(((2 * p) / 1000)::text, 4, '0'), sn,
       status, hyperparams,
       jsonb_build_object('final_val_accuracy', val, 'final_train_accuracy', least(1.0, val + 0.02),
                          'duration_ms', duration),
       'digits', 'mlp', $2::int, duration, CASE WHEN sn THEN 'bench-' || lpad((2 * p)::text, 7, '0') END, $2::int + 1,
       at, at + duration * interval '1 ms', at, at
FROM (SELECT p, sn, CASE WHEN random() < 0.85 THEN 'completed' WHEN random() < 0.67 THEN 'pruned' ELSE 'failed' END
             AS status,
             jsonb_build_object('lr', round((10 ^ (-4 + 2.5 * r_lr))::numeric, 6), 'hidden',
                                (ARRAY[64, 128, 256])[1 + floor(r_hidden * 3)::int], 'depth', 2,
                                'dropout', round((0.5 * r_drop)::numeric, 3), 'epochs', $2::int) AS hyperparams,
             least(0.999, 0.90 + 0.05 * r_ceiling + CASE WHEN sn THEN 0.004 ELSE 0 END + 0.02 * (random() - 0.5))
             AS val,
             (500 + 2500 * r_ceiling) * CASE WHEN sn THEN 1.08 ELSE 1 END AS duration,
             now() - interval '30 days' + p * interval '40 s' AS at
      FROM (SELECT p, random() AS r_lr, random() AS r_hidden, random() AS r_drop, random() AS r_ceiling
            FROM generate_series(0, $1::int / 2 - 1) AS p) AS pairs
      CROSS JOIN (VALUES (false), (true)) AS arm(sn)) AS rows
"""

FILL_CURVES = """
INSERT INTO trial_metrics (trial_id, epoch, seq, train_loss, val_loss, train_accuracy, val_accuracy, measurements,
                           spectral_norms, occurred_at)
SELECT id, e, e + 1, -ln(acc + 0.02), -ln(acc), acc + 0.02, acc,
       jsonb_build_object('val_accuracy', acc),
       CASE WHEN spectral_norm
            THEN jsonb_build_object('layers.0', 1 + 0.002 * (random() - 0.5), 'layers.1', 1 + 0.002 * (random() - 0.5),
                                    'layers.2', 1 + 0.002 * (random() - 0.5))
            ELSE jsonb_build_object('layers.0', 1.5 + 4 * random(), 'layers.1', 1.5 + 4 * random(),
                                    'layers.2', 1.5 + 4 * random()) END,
       started_at + (e + 1) * (duration_ms / $1::int) * interval '1 ms'
FROM (SELECT t.*, e, (t.metrics->>'final_val_accuracy')::float8 * (1 - exp(-(e + 1) / 7.5)) / (1 - exp(-$1::int / 7.5))
             AS acc
      FROM trials t CROSS JOIN generate_series(0, $1::int - 1) AS e
      WHERE e < CASE WHEN t.status = 'completed' THEN $1::int ELSE $1::int / 3 END) AS curve
"""


def _median(samples: list[float]) -> float:
    return round(statistics.median(samples), 3)


async def _timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    result = await work()
    return time.perf_counter() - started, result


def _cli(url: str, *options: str, tries: int = 5) -> float:
    """One `sntrack report` as a user runs it, in seconds; retried when the shared server is out of connections
    (other work on this machine), which is not the report's time."""
    env = {**os.environ, "SNTRACK_DATABASE_URL": url}
    for _ in range(tries):
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "sntrack", "report", *options], env=env, capture_output=True,
                             text=True, timeout=300)
        elapsed = time.perf_counter() - started
        if out.returncode == 0 and "verdict" in out.stdout:
            return elapsed
        if "too many clients" not in out.stderr:
            break
        time.sleep(2)
    raise RuntimeError(f"sntrack report failed: {out.stderr[-500:]}")


# build_report in a fresh interpreter after a load, as `sntrack report` runs it, with or without its forked child (the
# child is forked only where the process has no other thread, and this benchmark's has asyncio's executor).
FRESH_BUILD = """
import asyncio, time
import asyncpg
from consumers.report.report import build_report
from consumers.report.snapshot import load
async def loaded():
    conn = await asyncpg.connect({url!r})
    try:
        return await load(conn, curves=False)
    finally:
        await conn.close()
data = asyncio.run(loaded())
started = time.perf_counter()
build_report(data, fork={fork})
print(time.perf_counter() - started)
"""


def _python_output(code: str) -> str:
    """What a fresh interpreter running `code` prints, with one OpenBLAS thread as `sntrack report` runs."""
    return subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True,
                          env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}).stdout


def _python(code: str) -> float:
    """Seconds for a fresh interpreter to run `code`, with one OpenBLAS thread as `sntrack report` runs."""
    started = time.perf_counter()
    _python_output(code)
    return time.perf_counter() - started


# What `sntrack report` imports before it connects, and what it imports in a thread while the server reads.
CLI_IMPORTS = "import sntrack.cli, consumers.report.snapshot"
# The latter timed in a fresh interpreter after the former, as the command imports them (it prints the seconds).
STATISTICS_IMPORTS = (f"{CLI_IMPORTS}\nimport time\nstarted = time.perf_counter()\nimport numpy\n"
                      "from consumers.report.lazy_stats import import_special_functions\nimport_special_functions()\n"
                      "import consumers.report.report\nprint(time.perf_counter() - started)")
# What scipy.stats would add to the special functions: a report over more than 50 pairs no longer imports it.
SCIPY_SPECIAL, SCIPY_STATS = "import numpy, scipy.special", "import numpy, scipy.special, scipy.stats"


async def _queries(conn: asyncpg.Connection) -> dict[str, float]:
    """Each read of the report alone, one after the other, without JIT as `load` runs them, in ms (median of
    REPEATS)."""
    out = {}
    await conn.execute("SET jit = off")
    for name in ("REPORT_TRIALS", "REPORT_TRIAL_JSON", "REPORT_CURVES"):
        samples = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            await conn.fetch(getattr(queries, name), None, None)
            samples.append(time.perf_counter() - started)
        out[name] = round(statistics.median(samples) * 1000, 1)
    return out


async def _load(url: str, helpers: int, curves: bool):
    """`load` as `sntrack report` runs it: connect, then read, the curves too where `curves` (`--format json` or
    `csv`, `--plot`), with `helpers` connections beside the loading one (0: that one reads everything in turn)."""
    connections = await asyncio.gather(*(asyncpg.connect(url) for _ in range(1 + helpers)))
    try:
        return await load(connections[0], curves=curves, helpers=connections[1:])
    finally:
        await asyncio.gather(*(c.close() for c in connections))


async def run(database_url: str, trials: int = 100_000) -> dict:
    scratch_url = with_path(database_url, f"sntrack_bench_report_{uuid.uuid4().hex[:8]}")
    await asyncio.to_thread(create_database, scratch_url)
    try:
        conn = await asyncpg.connect(scratch_url)
        try:
            await migrate(conn)
            started = time.perf_counter()
            await conn.execute("SELECT setseed(0.42)")
            await conn.execute(FILL_TRIALS, trials, EPOCHS)
            await conn.execute(FILL_CURVES, EPOCHS)
            summaries = dict(migration_files())["013_trial_summary.sql"]  # as the trials projection keeps them
            await conn.execute(summaries[summaries.index("UPDATE trials"):])
            await conn.execute(f"INSERT INTO sn_comparison ({', '.join(COMPARISON_COLUMNS)}) "
                               f"SELECT {', '.join(COMPARISON_COLUMNS)} FROM ({COMPARISON_FROM_TRIALS}) AS derived")
            await conn.execute("VACUUM ANALYZE trials")
            await conn.execute("VACUUM ANALYZE trial_metrics")
            await conn.execute("VACUUM ANALYZE sn_comparison")
            # The fill's dirty pages written now, not by the checkpointer while the report is timed: a report runs
            # on a settled database, not one that has just bulk-loaded 2.7 million rows.
            await conn.execute("CHECKPOINT")
            fill_s = time.perf_counter() - started
            curve_rows = await conn.fetchval("SELECT count(*) FROM trial_metrics")
            query_ms = await _queries(conn)
        finally:
            await conn.close()

        load_before = round(os.getloadavg()[0], 2)
        cli = [await asyncio.to_thread(_cli, scratch_url) for _ in range(CLI_REPEATS)]
        cli_json = [await asyncio.to_thread(_cli, scratch_url, "--format", "json") for _ in range(REPEATS)]
        cli_imports, statistics_imports, special, scipy_stats = [], [], [], []
        for _ in range(REPEATS):
            for samples, code in ((cli_imports, CLI_IMPORTS), (special, SCIPY_SPECIAL), (scipy_stats, SCIPY_STATS)):
                samples.append(await asyncio.to_thread(_python, code))
            statistics_imports.append(float(await asyncio.to_thread(_python_output, STATISTICS_IMPORTS)))
        load_s, curves_s, one_connection_s, build_s, render_s, in_memory_s = [], [], [], [], [], []
        fresh_s, forked_s = [], []
        for _ in range(REPEATS):
            one_connection_s.append((await _timed(lambda: _load(scratch_url, 0, True)))[0])
            curves_s.append((await _timed(lambda: _load(scratch_url, HELPERS + CURVE_HELPERS, True)))[0])
            elapsed, data = await _timed(lambda: _load(scratch_url, HELPERS, False))
            load_s.append(elapsed)
            started = time.perf_counter()
            report = build_report(data)
            build_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            render_table(report)
            render_s.append(time.perf_counter() - started)
            for samples, fork in ((fresh_s, False), (forked_s, True)):
                code = FRESH_BUILD.format(url=scratch_url, fork=fork)
                samples.append(float(await asyncio.to_thread(_python_output, code)))
        for _ in range(REPEATS):  # the baseline: the same statistics from data already in memory
            started = time.perf_counter()
            build_report(data)
            in_memory_s.append(time.perf_counter() - started)
    finally:
        await asyncio.to_thread(drop_database, scratch_url)
    in_process = [a + b + c for a, b, c in zip(load_s, build_s, render_s, strict=True)]
    return {
        "trials": trials, "epochs": EPOCHS, "curve_rows": curve_rows, "fill_s": round(fill_s, 1),
        "design": report["design"]["primary"], "pairs": report["tests"]["paired"]["n_pairs"],
        "verdict": report["verdict"]["outcome"],
        "cli_s": _median(cli), "cli_samples_s": [round(s, 3) for s in cli],
        "cli_json_s": _median(cli_json), "cli_json_samples_s": [round(s, 3) for s in cli_json],
        "interpreter_and_cli_imports_s": _median(cli_imports),
        "statistics_imports_s": _median(statistics_imports),
        "scipy_stats_over_special_s": round(_median(scipy_stats) - _median(special), 3),
        "in_process_s": _median(in_process), "load_s": _median(load_s), "helpers": HELPERS,
        "curve_helpers": CURVE_HELPERS,
        "load_with_curves_s": _median(curves_s), "load_one_connection_s": _median(one_connection_s),
        "build_s": _median(build_s), "build_fresh_s": _median(fresh_s), "build_forked_s": _median(forked_s),
        "build_fresh_runs": len(fresh_s),
        "render_s": _median(render_s), "in_memory_build_s": _median(in_memory_s),
        "query_ms": query_ms, "target_s": TARGET_S, "target_met": _median(cli) <= TARGET_S,
        "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    from sntrack.settings import Settings

    print(json.dumps(asyncio.run(run(Settings.from_env().database_url, int(sys.argv[1]) if len(sys.argv) > 1
                                     else 100_000)), indent=2))
