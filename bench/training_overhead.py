"""The worker's training-time overhead: the same trial (same seed, same data) under each way of tracking it.

Arms: no tracking at all; sntrack events only; sntrack events + its MLflow logging as shipped (background
threads); the loop a user would otherwise write, `mlflow.log_metrics` each epoch on the training thread; and the
callback a user would otherwise install, optuna-integration's `MLflowCallback` (params and the final value per
trial, no curves). Plus the spectral-norm arm (no tracking) against the baseline arm: SN's own cost, a finding.

Method, for a small effect on a noisy shared machine: every repetition runs every arm once, in rotated order, and
each arm's figure is the median over repetitions of its ratio to the no-tracking trial of the same repetition,
with a bootstrap 95% interval of that median. Three clocks per trial: wall time; the training thread's own CPU time
(time.thread_time: what tracking adds to the thread that trains, waits excluded); and the CPU time of every other
thread of the process (the publisher, MLflow and timer threads) over the trial and until its tracking work has
settled. Background work is let finish between trials, so one arm's leftovers never land in the next arm's trial.
After the repetitions, instrumented trials break the per-epoch work on the training thread down in µs of CPU.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import statistics
import time
import urllib.request
import uuid
import warnings
from collections.abc import Callable
from unittest import mock

import mlflow
import torch

from producer import tracking, training
from producer.emitter import TrialEvents, producer_info
from producer.model import SingularValueMeter
from producer.publisher import EventPublisher
from producer.tracking import MlflowLogger, Tracker, bound_mlflow_http
from producer.training import TrialConfig, run_trial
from sntrack.settings import Settings
from tests.sandbox import sandbox

TARGET_OVERHEAD_PCT = 2.0
CONFIG = TrialConfig(spectral_norm=False, lr=3e-3, hidden=64, depth=2, dropout=0.1, weight_decay=1e-4,
                     batch_size=64, epochs=30, seed=7, dataset="digits")
BOOTSTRAP_RESAMPLES = 10_000
BREAKDOWN_TRIALS = 3
EXPERIMENT = "sntrack-bench"


class _NoTracking:
    def started(self, payload):
        pass

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        pass

    def stopped(self, outcome, model):
        pass


class _InlineMlflow(_NoTracking):
    """The loop a user would write: MLflow's fluent API called in the training loop."""

    def __init__(self, experiment_id: str):
        self.experiment_id = experiment_id

    def started(self, payload):
        mlflow.start_run(experiment_id=self.experiment_id, run_name=f"inline-{uuid.uuid4().hex[:6]}")
        mlflow.log_params(payload.hyperparams)

    def epoch(self, epoch, measurements, spectral_norms, step=None):
        mlflow.log_metrics(measurements, step=epoch)

    def stopped(self, outcome, model):
        mlflow.end_run()


@dataclasses.dataclass
class _Clocks:
    """One trial: wall and training-thread CPU over the timed work; other threads' CPU until it settled."""

    wall_ms: float = 0.0
    train_cpu_ms: float = 0.0
    tracking_cpu_ms: float = 0.0


class _Timed:
    """Accumulates the wall and training-thread CPU of the blocks run inside it."""

    def __init__(self, clocks: _Clocks):
        self.clocks = clocks

    def __enter__(self):
        self._wall, self._cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *_):
        self.clocks.wall_ms += (time.perf_counter() - self._wall) * 1000
        self.clocks.train_cpu_ms += (time.thread_time() - self._cpu) * 1000


def _reachable(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _median_ci(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """The median and a percentile-bootstrap 95% interval of it."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(BOOTSTRAP_RESAMPLES))
    return (statistics.median(values), medians[int(0.025 * BOOTSTRAP_RESAMPLES)],
            medians[int(0.975 * BOOTSTRAP_RESAMPLES) - 1])


def _pct(ratio: float) -> float:
    return round(100 * (ratio - 1), 2)


def _summary(trials: list[_Clocks], baseline: list[_Clocks]) -> dict:
    """Medians of each clock, and the median paired ratio to no tracking with its 95% interval (wall and
    training-thread CPU)."""
    summary = {"runs": len(trials),
               "median_ms": round(statistics.median(t.wall_ms for t in trials), 1),
               "train_cpu_ms": round(statistics.median(t.train_cpu_ms for t in trials), 1),
               "tracking_cpu_ms_per_trial": round(statistics.median(t.tracking_cpu_ms for t in trials), 2)}
    for clock, key in (("wall_ms", "overhead"), ("train_cpu_ms", "train_cpu_overhead")):
        ratios = [getattr(arm, clock) / getattr(base, clock) for arm, base in zip(trials, baseline, strict=True)]
        median, low, high = _median_ci(ratios)
        summary[f"{key}_pct"], summary[f"{key}_pct_ci95"] = _pct(median), [_pct(low), _pct(high)]
    return summary


def _optuna_arm(tracking_uri: str) -> Callable[[TrialConfig, _Timed], None]:
    """A trial as an Optuna user with optuna-integration's MLflowCallback runs it: the callback is timed, Optuna's
    own ask/tell (in memory, the same with or without tracking) is not."""
    import optuna
    from optuna_integration.mlflow import MLflowCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", category=FutureWarning, module=__name__)  # deprecated since 4.9, still shipped
    study = optuna.create_study(study_name=f"{EXPERIMENT}-optuna", direction="maximize")
    callback = MLflowCallback(tracking_uri=tracking_uri, metric_name="val_accuracy")

    def trial(config: TrialConfig, timed: _Timed) -> None:
        asked = study.ask()
        for name, value in config.hyperparams().items():
            asked.suggest_categorical(name, [value])
        with timed:
            outcome = run_trial(config, _NoTracking(), measure_norms=False)
        frozen = study.tell(asked, outcome.measurements["final_val_accuracy"])
        with timed:
            callback(study, frozen)

    return trial


def _recorder_arm(recorder_for: Callable[[], object], measure_norms: bool) -> Callable[[TrialConfig, _Timed], None]:
    def trial(config: TrialConfig, timed: _Timed) -> None:
        with timed:
            run_trial(config, recorder_for(), measure_norms=measure_norms)

    return trial


class _Stopwatch:
    """The training thread's CPU time (not wall: a loaded machine deschedules the thread mid-call) in calls."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            began = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - began
                self.calls += 1

        return timed

    def us_per(self, epochs: int) -> float:
        return round(self.seconds * 1e6 / epochs, 1)


def _breakdown(config: TrialConfig, publisher: EventPublisher, logger: MlflowLogger | None, epoch_ms: float) -> dict:
    """µs of training-thread CPU per epoch, from instrumented trials of the shipped arm."""
    meter, build, hand_off, recorder_epoch = _Stopwatch(), _Stopwatch(), _Stopwatch(), _Stopwatch()

    class TimedMeter(SingularValueMeter):
        measure = meter.wrap(SingularValueMeter.measure)

    class TimedEvents(TrialEvents):
        metric = build.wrap(TrialEvents.metric)

    class TimedPublisher:
        publish = staticmethod(hand_off.wrap(publisher.publish))
        flush = staticmethod(publisher.flush)

    tracker = Tracker(TimedPublisher(), producer_info("bench"), logger)
    with mock.patch.object(training, "SingularValueMeter", TimedMeter), \
            mock.patch.object(tracking, "TrialEvents", TimedEvents):
        for _ in range(BREAKDOWN_TRIALS):
            recorder = tracker.trial(f"bench-{uuid.uuid4().hex[:8]}", "bench")
            recorder.epoch = recorder_epoch.wrap(recorder.epoch)
            run_trial(config, recorder)
            publisher.flush(30)
            if logger is not None:
                logger.sync(30)
    epochs = BREAKDOWN_TRIALS * config.epochs
    rest = recorder_epoch.seconds - build.seconds - hand_off.seconds
    return {"trials": BREAKDOWN_TRIALS, "epoch_cpu_ms": round(epoch_ms, 2),
            "singular_value_meter_us": meter.us_per(epochs), "event_build_us": build.us_per(epochs),
            "publish_hand_off_us": hand_off.us_per(epochs),
            "rest_of_recorder_us": round(rest * 1e6 / epochs, 1),
            "mlflow": logger is not None}


def _measure(settings: Settings, tracking_uri: str | None, repetitions: int, epochs: int, budget_s: float,
             log) -> dict:
    torch.set_num_threads(1)
    config = dataclasses.replace(CONFIG, epochs=epochs)
    load_before = round(os.getloadavg()[0], 2)
    with EventPublisher(settings.publisher()) as publisher:
        producer = producer_info("bench")
        events = Tracker(publisher, producer)
        arms = {"no_tracking": (_recorder_arm(_NoTracking, False), config),
                "events": (_recorder_arm(lambda: events.trial(f"bench-{uuid.uuid4().hex[:8]}", "bench"), True),
                           config),
                "sn_no_tracking": (_recorder_arm(_NoTracking, False), dataclasses.replace(config, spectral_norm=True))}
        logger = None
        if tracking_uri:
            bound_mlflow_http(5, max_retries=1)
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
            logger = MlflowLogger(tracking_uri, EXPERIMENT)
            shipped = Tracker(publisher, producer, logger)
            mlflow.set_tracking_uri(tracking_uri)
            experiment_id = mlflow.set_experiment(EXPERIMENT).experiment_id
            arms["events_mlflow_shipped"] = (
                _recorder_arm(lambda: shipped.trial(f"bench-{uuid.uuid4().hex[:8]}", "bench"), True), config)
            arms["mlflow_log_metrics_inline"] = (_recorder_arm(lambda: _InlineMlflow(experiment_id), False), config)
            arms["optuna_mlflow_callback"] = (_optuna_arm(tracking_uri), config)
        names = list(arms)
        clocks: dict[str, list[_Clocks]] = {name: [] for name in names}
        run_trial(config, _NoTracking())  # warm-up: data set loading and first-call costs
        started = time.monotonic()
        published_before, publisher_cpu_before = publisher.stats.published, publisher.stats.thread_cpu_s
        for rep in range(repetitions):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                trial, arm_config = arms[name]
                trial_clocks = _Clocks()
                process_cpu, thread_cpu = time.process_time(), time.thread_time()
                trial(arm_config, _Timed(trial_clocks))
                publisher.flush(30)
                if logger is not None:
                    logger.sync(30)
                others = (time.process_time() - process_cpu) - (time.thread_time() - thread_cpu)
                trial_clocks.tracking_cpu_ms = others * 1000
                clocks[name].append(trial_clocks)
            log(f"  repetition {rep + 1}: " + ", ".join(f"{n} {clocks[n][-1].wall_ms:.0f} ms" for n in names))
            if time.monotonic() - started > budget_s:
                log(f"  stopped after {rep + 1} repetitions: the {budget_s:.0f} s budget is spent")
                break
        stats = publisher.stats
        events_sent = stats.published - published_before
        publisher_cpu = stats.thread_cpu_s - publisher_cpu_before
        base = clocks["no_tracking"]
        breakdown = _breakdown(config, publisher, logger, statistics.median(c.train_cpu_ms for c in base) / epochs)
        if logger is not None:
            logger.close(30)
    return {"trial": {**dataclasses.asdict(config), "torch_threads": 1},
            "repetitions": len(base),
            "arms": {name: _summary(clocks[name], base) for name in names if name != "sn_no_tracking"},
            "spectral_norm_vs_baseline": _summary(clocks["sn_no_tracking"], base),
            "per_epoch_us": breakdown,
            "publisher_thread": {"events": events_sent,
                                 "cpu_us_per_event": round(publisher_cpu * 1e6 / max(events_sent, 1), 1)},
            "target_overhead_pct": TARGET_OVERHEAD_PCT,
            "load_avg_1m": [load_before, round(os.getloadavg()[0], 2)], "cpus": os.cpu_count(),
            **({} if tracking_uri else {"mlflow": "skipped: no MLflow server answered"})}


async def run(base: Settings, *, repetitions: int = 31, epochs: int = 30, tracking_uri: str | None = None,
              budget_s: float = 240.0, log=print) -> dict:
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
