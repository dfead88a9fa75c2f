"""The worker's training-time overhead: wall time of the same trial (same seed, same data), arms interleaved.

Arms: no tracking at all; sntrack events only; sntrack events + its MLflow logging as shipped (background
thread); and the loop a user would otherwise write, `mlflow.log_metrics` each epoch on the training thread.
Plus the spectral-norm arm (no tracking) against the baseline arm: SN's own cost, a research finding.
Each figure is a median over repetitions; every repetition runs every arm once, in rotated order, so drift in
the machine's load hits all arms alike. Background work (confirms, MLflow calls) is let finish between trials,
untimed, so one arm's leftovers never slow the next arm's trial.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import time
import urllib.request
import uuid

import mlflow
import torch

from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.tracking import MlflowLogger, Tracker, bound_mlflow_http
from producer.training import TrialConfig, run_trial
from sntrack.settings import Settings
from tests.sandbox import sandbox

TARGET_OVERHEAD_PCT = 2.0
CONFIG = TrialConfig(spectral_norm=False, lr=3e-3, hidden=64, depth=2, dropout=0.1, weight_decay=1e-4,
                     batch_size=64, epochs=30, seed=7, dataset="digits")


class _NoTracking:
    def started(self, payload):
        pass

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        pass

    def stopped(self, outcome, model):
        pass


class _InlineMlflow:
    """The baseline a user would write: MLflow's fluent API called in the training loop."""

    def started(self, payload):
        mlflow.start_run(run_name=f"inline-{uuid.uuid4().hex[:6]}")
        mlflow.log_params(payload.hyperparams)

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        mlflow.log_metrics(measurements, step=epoch)

    def stopped(self, outcome, model):
        mlflow.end_run()


def _reachable(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _summary(samples: list[float], baseline: list[float]) -> dict:
    """Overhead as the median of per-repetition ratios to the no-tracking trial of the same repetition: the
    machine's load drifts by more than the effect being measured, and pairing within a repetition cancels it."""
    ratios = [arm / base for arm, base in zip(samples, baseline, strict=False)]
    return {"median_ms": round(statistics.median(samples), 1), "min_ms": round(min(samples), 1),
            "runs": len(samples), "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
            "overhead_pct_range": [round(100 * (min(ratios) - 1), 1), round(100 * (max(ratios) - 1), 1)]}


def _measure(settings: Settings, tracking_uri: str | None, repetitions: int, epochs: int, budget_s: float,
             log) -> dict:
    torch.set_num_threads(1)
    config = dataclasses.replace(CONFIG, epochs=epochs)
    with EventPublisher(settings.publisher()) as publisher:
        producer = producer_info("bench")
        events = Tracker(publisher, producer)
        arms = {"no_tracking": (lambda: _NoTracking(), config, False),
                "events": (lambda: events.trial(f"bench-{uuid.uuid4().hex[:8]}", "bench"), config, True),
                "sn_no_tracking": (lambda: _NoTracking(), dataclasses.replace(config, spectral_norm=True), False)}
        logger = None
        if tracking_uri:
            bound_mlflow_http(5, max_retries=1)
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            logger = MlflowLogger(tracking_uri, "sntrack-bench")
            shipped = Tracker(publisher, producer, logger)
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_experiment("sntrack-bench")
            arms["events_mlflow_shipped"] = (
                lambda: shipped.trial(f"bench-{uuid.uuid4().hex[:8]}", "bench"), config, True)
            arms["mlflow_log_metrics_inline"] = (lambda: _InlineMlflow(), config, True)
        names = list(arms)
        times: dict[str, list[float]] = {name: [] for name in names}
        run_trial(config, _NoTracking())  # warm-up: data set loading and first-call costs
        started = time.monotonic()
        for rep in range(repetitions):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                recorder_for, arm_config, measure = arms[name]
                began = time.perf_counter()
                run_trial(arm_config, recorder_for(), measure_norms=measure)
                times[name].append((time.perf_counter() - began) * 1000)
                publisher.flush(30)
                if logger is not None:
                    logger.sync(30)
            log(f"  repetition {rep + 1}: " + ", ".join(f"{n} {times[n][-1]:.0f} ms" for n in names))
            if time.monotonic() - started > budget_s:
                break
        if logger is not None:
            logger.close(30)
    base = times["no_tracking"]
    result = {"trial": {**dataclasses.asdict(config), "torch_threads": 1},
              "arms": {name: _summary(times[name], base) for name in names if name != "sn_no_tracking"},
              "spectral_norm_vs_baseline": _summary(times["sn_no_tracking"], base),
              "target_overhead_pct": TARGET_OVERHEAD_PCT}
    if not tracking_uri:
        result["mlflow"] = "skipped: no MLflow server answered"
    return result


async def run(base: Settings, *, repetitions: int = 5, epochs: int = 30, tracking_uri: str | None = None,
              budget_s: float = 75.0, log=print) -> dict:
    """Measure in a throw-away vhost and database; MLflow arms when `tracking_uri` (default: the settings')
    answers."""
    uri = tracking_uri or base.mlflow_tracking_uri
    uri = uri if _reachable(uri) else None
    log(f"training overhead: {repetitions} interleaved repetitions of a {epochs}-epoch digits trial"
        + ("" if uri else " (no MLflow server: MLflow arms skipped)"))
    async with sandbox(base, prefix="sntrack-bench-train") as settings:
        return await asyncio.to_thread(_measure, settings, uri, repetitions, epochs, budget_s, log)


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(run(Settings.from_env())), indent=2))
