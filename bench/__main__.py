"""`make bench` / `python -m bench`: run every benchmark, each figure beside its same-run baseline.

Writes bench/results/latest.json and bench/results/latest.md (the README links them). Options:
  --quick          shorter runs (smoke-checks the harness; figures are noisier)
  --only NAME ...  pipeline, comparison, mlflow, training, report, gateway, dashboard, rebuild, catchup, replay
                   (the others keep their last results)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import (
    catchup_bench,
    comparison_query,
    dashboard_bench,
    gateway_bench,
    mlflow_sync,
    pipeline,
    rebuild_stall,
    replay_bench,
    report_bench,
    training_overhead,
)
from bench.report import LOOP_STEPS, render_markdown
from sntrack.logging import configure_logging
from sntrack.mlflow_server import free_port, healthy, start
from sntrack.settings import Settings
from tests.sandbox import sandbox

RESULTS = Path(__file__).parent / "results"
NAMES = ("pipeline", "comparison", "mlflow", "training", "report", "gateway", "dashboard", "rebuild", "catchup",
         "replay")


async def _with_mlflow(base: Settings, work):
    """Run `work(url)` against the configured MLflow server, or a temporary one when none answers."""
    if healthy(base.mlflow_tracking_uri):
        return await work(base.mlflow_tracking_uri, None)
    with tempfile.TemporaryDirectory(prefix="sntrack-bench-mlflow-") as folder:
        server = await asyncio.to_thread(start, free_port(), f"sqlite:///{folder}/mlflow.db", Path(folder))
        try:
            return await work(server.url, round(server.startup_s, 1))
        finally:
            server.stop()


async def _mlflow(base: Settings, quick: bool) -> dict:
    async def work(url: str, startup_s: float | None) -> dict:
        load_before = round(os.getloadavg()[0], 2)
        async with sandbox(base, prefix="sntrack-bench-mlflow", mlflow_tracking_uri=url) as settings:
            result = await mlflow_sync.run(settings, trials=30 if quick else 100)
            backlog = await mlflow_sync.backlog_drain(settings, trials=300 if quick else 2000)
            stop = await mlflow_sync.graceful_stop(settings, trials=300 if quick else 1000)
            curves = await mlflow_sync.curve_throughput(settings, trials=10 if quick else 40, epochs=50)
        return {**result, "backlog": backlog, "stop": stop, "curves": curves, "server": url,
                "server_startup_s": startup_s, "cpus": os.cpu_count(),
                "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)]}

    return await _with_mlflow(base, work)


async def _training(base: Settings, quick: bool) -> dict:
    async def work(url: str, startup_s: float | None) -> dict:
        return await training_overhead.run(base, repetitions=2 if quick else 31, tracking_uri=url,
                                           budget_s=40 if quick else 240)

    return await _with_mlflow(base, work)


def _loop_s() -> float:
    """Seconds for LOOP_STEPS steps of a plain Python loop: one reading of the shared host's speed, which changes from
    day to day. It does not follow every slowdown (README, Benchmarks): the same-run baselines are the comparison."""
    started, total = time.perf_counter(), 0
    for step in range(LOOP_STEPS):
        total += step
    return round(time.perf_counter() - started, 3)


def _keep_earlier(results: dict) -> None:
    """With --only, the benchmarks not run keep their last results (each marked with the run it came from)."""
    latest = RESULTS / "latest.json"
    if not latest.exists():
        return
    earlier = json.loads(latest.read_text())
    for name, result in earlier.get("benchmarks", {}).items():
        if name not in results["benchmarks"]:
            results["benchmarks"][name] = {**result, "from_run": result.get("from_run", earlier["started_at"])}


async def main(names: list[str], quick: bool) -> int:
    base = Settings.from_env()
    results: dict = {"started_at": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
                     "python": platform.python_version(), "quick": quick, "benchmarks": {}}
    runners = {
        "pipeline": lambda: pipeline.run(base, duration_s=4 if quick else 8,
                                         throughput_events=5000 if quick else 20_000),
        "comparison": lambda: comparison_query.run(base.database_url, trials=20_000 if quick else 100_000),
        "mlflow": lambda: _mlflow(base, quick),
        "training": lambda: _training(base, quick),
        "report": lambda: report_bench.run(base.database_url, trials=20_000 if quick else 100_000),
        "gateway": lambda: gateway_bench.run(base, duration_s=4 if quick else 10,
                                             throughput_events=5000 if quick else 20_000),
        "dashboard": lambda: dashboard_bench.run(base, duration_s=4 if quick else 8),
        "rebuild": lambda: rebuild_stall.run(base, trials=20_000 if quick else 100_000),
        "catchup": lambda: catchup_bench.run(base, events=10_000 if quick else 50_000),
        "replay": lambda: replay_bench.run(base, events=20_000 if quick else 200_000),
    }
    failed = []
    for name in names:
        print(f"== {name}", flush=True)
        loop_s = _loop_s()
        started = time.perf_counter()
        try:
            results["benchmarks"][name] = await runners[name]()
        except Exception as exc:  # noqa: BLE001 - record it, run the others, fail at the end
            traceback.print_exc()
            results["benchmarks"][name] = {"error": repr(exc)}
            failed.append(name)
        results["benchmarks"][name].update(wall_s=round(time.perf_counter() - started, 1), loop_s=loop_s)
    RESULTS.mkdir(exist_ok=True)
    _keep_earlier(results)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "latest.md").write_text(render_markdown(results))
    print((RESULTS / "latest.md").read_text())
    print(f"results: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), metavar="NAME")
    args = parser.parse_args()
    configure_logging(json_lines=True)
    sys.exit(asyncio.run(main(args.only, args.quick)))
