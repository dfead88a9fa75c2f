"""The training worker's set-up around `Worker.run`: stopping on signals, the publisher, MLflow logging, and the
report of trials whose worker stopped beating. `sntrack worker` parses its flags into a WorkerConfig and runs
a WorkerSession (the library never reads the environment)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass

import optuna
import structlog

from common.errors import ConfigurationError
from producer.config import PublisherConfig
from producer.emitter import producer_info
from producer.publisher import EventPublisher, PublisherStats
from producer.study import Heartbeat, lost_trial_stop
from producer.tracking import MlflowLogger, Tracker, bound_mlflow_http

log = structlog.get_logger("sntrack.worker")

CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WorkerMlflowConfig:
    tracking_uri: str
    experiment: str  # a name, or a template: {study} = the model_run_id
    timeout_s: float = 10.0
    start_wait_s: float = 2.0  # a trial's start event waits this long for its run id


@dataclass(frozen=True)
class WorkerConfig:
    publisher: PublisherConfig
    heartbeat_s: int = 30  # Optuna's heartbeat; after two missed beats another worker reports the trial lost
    mlflow: WorkerMlflowConfig | None = None  # None: no MLflow logging (start events carry a null run id)
    worker_id: str | None = None


def stop_on_signals() -> threading.Event:
    """Install SIGTERM/SIGINT handlers: the first sets the returned event (the running trial ends as interrupted),
    the second raises KeyboardInterrupt (what is in memory is spooled on the way out), later ones are ignored so
    that spooling is not interrupted
    (tests/test_worker_pipeline.py::test_sigterm_stops_the_running_trial_as_interrupted,
    tests/test_worker_kills.py::test_second_ctrl_c_during_shutdown_still_spools_what_is_in_memory)."""
    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, _frame) -> None:
        nonlocal signals
        signals += 1
        if signals == 2:
            log.warning("second signal: spooling what is in memory and exiting", signal=signal.Signals(signum).name)
            raise KeyboardInterrupt
        if signals > 2:
            return
        log.info("stopping: the running trial ends as interrupted", signal=signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    return stop


class WorkerSession:
    """The publisher and the tracker a worker's trials report through, for a `with` block. On exit the tracker and
    the publisher close; `delivered` tells whether every event was confirmed or spooled, `stats` the counts."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.producer = producer_info(config.worker_id)
        self.publisher = EventPublisher(config.publisher)
        self.tracker: Tracker | None = None
        self.delivered = False
        self.stats: PublisherStats | None = None

    def __enter__(self) -> WorkerSession:
        self.publisher.start()
        try:
            if refusal := self.publisher.first_contact():
                raise ConfigurationError(refusal)  # unreachable is fine (events spool); refused is a setting to fix
            mlflow = None
            if (settings := self.config.mlflow) is not None:
                bound_mlflow_http(settings.timeout_s, max_retries=1)
                mlflow = MlflowLogger(settings.tracking_uri, settings.experiment)
            self.tracker = Tracker(self.publisher, self.producer, mlflow, settings.start_wait_s if settings else 0.0)
        except BaseException:
            self.publisher.close(CLOSE_TIMEOUT_S)
            raise
        return self

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(self.config.heartbeat_s, self.report_lost)

    def report_lost(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna failed a trial whose worker stopped beating: publish its failed stop (worker_lost), durably."""
        stop_event = lost_trial_stop(trial, study.study_name, self.producer)
        log.warning("a trial's worker stopped beating; reported failed (worker_lost)", optuna_trial_number=trial.number,
                    trial_id=stop_event.trial_id if stop_event else None)
        if stop_event is not None:
            self.publisher.publish(stop_event)  # Optuna calls this only from Worker.run(), inside the session
            self.publisher.flush()

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        try:
            if self.tracker is not None:
                self.tracker.close(CLOSE_TIMEOUT_S)
        finally:
            # A second signal (KeyboardInterrupt): spool what is in memory now instead of waiting for the broker.
            interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
            self.delivered = self.publisher.close(CLOSE_TIMEOUT_S, interrupted=interrupted)
            self.stats = self.publisher.stats
