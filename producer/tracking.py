"""What a trial reports, and where: sntrack events (always) and MLflow (optional), never on the training path.

`Tracker` is one per worker; `tracker.trial(trial_id, model_run_id)` gives the `TrialRecorder` that
`producer.training.run_trial` reports to. Every recorder method returns at once:

- events are built on the training thread (seq, occurred_at) and handed to the publisher, which never blocks;
- all MLflow calls run on one background thread (`MlflowLogger`): create the run, params, the per-epoch
  series (batched: sent every METRICS_FLUSH_S and when the trial ends, one `log_batch` per run), the
  `state_dict` artifact and the terminal status. A slow MLflow server makes the series arrive later, never
  the training slower;
- the start event must carry the MLflow run id, so a trial's events are held (in order, in memory) until the
  background thread has created the run, for at most `start_wait_s`; then they go out with a null run id and
  the run, if it appears later, is still found by its `trial_id` tag. After an MLflow failure the logger rests
  for `COOLDOWN_S` (trials meanwhile carry a null run id at once) instead of waiting on a dead server per trial.
"""

from __future__ import annotations

import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from torch import nn

from producer.emitter import TrialEvents
from producer.model import state_dict_copy
from producer.training import TrialOutcome
from schemas import Event, ProducerInfo, RunStarted, StartPayload

log = structlog.get_logger("sntrack.worker")

COOLDOWN_S = 30.0
# The per-epoch series goes out at most this often (and when the trial ends): every MLflow call costs the training
# thread CPU and GIL time on a small machine even from a background thread (measured: docs/worker.md).
METRICS_FLUSH_S = 5.0
QUEUE_LIMIT = 10_000  # MLflow work items waiting; beyond that MLflow logging is dropped, training never waits
TERMINAL_STATUS = {"completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}


def bound_mlflow_http(timeout_s: float, max_retries: int) -> None:
    """Short MLflow HTTP timeouts and few retries for this process (the stock client waits 120 s and retries 7
    times with backoff); variables the user set win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))


@dataclass(eq=False)
class _Run:
    """One trial's MLflow run, as the background thread knows it."""

    trial_id: str
    model_run_id: str
    start: StartPayload
    on_run_id: Callable[[str | None], None]
    run_id: str | None = None
    pending_metrics: list = field(default_factory=list)


class MlflowLogger:
    """A daemon thread that owns every MLflow call of the worker."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        from mlflow.tracking import MlflowClient  # here: a worker without MLflow never pays its ~2 s import

        self._client = MlflowClient(tracking_uri)
        self._experiment_id: str | None = None
        self._down_until = 0.0
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._main, name="sntrack-mlflow", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def begin(self, trial_id: str, model_run_id: str, start: StartPayload,
              on_run_id: Callable[[str | None], None]) -> _Run:
        run = _Run(trial_id, model_run_id, start, on_run_id)
        if not self._submit(("begin", run)):
            on_run_id(None)
        return run

    def metrics(self, run: _Run, epoch: int, values: dict[str, float], timestamp_ms: int) -> None:
        self._submit(("metrics", run, epoch, values, timestamp_ms))

    def end(self, run: _Run, status: str, state_dict: dict[str, torch.Tensor] | None) -> None:
        self._submit(("end", run, status, state_dict))

    def sync(self, timeout: float) -> bool:
        """Wait until everything queued so far has been sent (or given up). True when it was, within `timeout`."""
        done = threading.Event()
        return self._submit(("sync", done)) and done.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Let the thread finish what is queued, within `timeout`. True when it did."""
        try:
            self._queue.put(("close",), timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _submit(self, item: tuple) -> bool:
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            log.warning("MLflow logging falls behind; dropping MLflow work (events are unaffected)")
            return False

    # -- the background thread ------------------------------------------------------------------------------

    def _main(self) -> None:
        waiting: list[_Run] = []  # runs with metrics collected and not yet sent
        flush_at = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, flush_at - time.monotonic()) if waiting else None)
            except queue.Empty:  # time to send what was collected: one call per run, however many epochs
                self._flush_metrics(waiting)
                waiting = []
                continue
            if item[0] == "metrics":
                run, epoch, values, timestamp_ms = item[1:]
                if run.run_id is not None:
                    from mlflow.entities import Metric

                    run.pending_metrics.extend(Metric(k, v, timestamp_ms, epoch) for k, v in values.items())
                    if not waiting:
                        flush_at = time.monotonic() + METRICS_FLUSH_S
                    if run not in waiting:
                        waiting.append(run)
                continue
            self._flush_metrics(waiting)
            waiting = []
            if item[0] == "close":
                return
            if item[0] == "sync":
                item[1].set()
            elif item[0] == "begin":
                run = item[1]
                run.run_id = self._call("create the run", self._create_run, run)
                run.on_run_id(run.run_id)
            elif item[1].run_id is not None:
                self._call("finish the run", self._finish_run, *item[1:])

    def _flush_metrics(self, runs: list[_Run]) -> None:
        for run in runs:
            metrics, run.pending_metrics = run.pending_metrics, []
            for start in range(0, len(metrics), 1000):  # MLflow's per-request limit
                self._call("log metrics", self._client.log_batch, run.run_id, metrics=metrics[start:start + 1000])

    def _call(self, what: str, fn: Callable, *args, **kwargs):
        if not self.available:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._down_until = time.monotonic() + COOLDOWN_S
            log.warning(f"MLflow: could not {what}; training goes on, MLflow rests", tracking_uri=self.tracking_uri,
                        cooldown_s=COOLDOWN_S, error=f"{type(exc).__name__}: {exc}"[:300])
            return None

    def _experiment_id_for_runs(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self._client.create_experiment(self.experiment)
                except Exception:  # another worker created it first
                    found = self._client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            self._experiment_id = self._experiment_id or found.experiment_id
        return self._experiment_id

    def _create_run(self, run: _Run) -> str:
        tags = {"trial_id": run.trial_id, "model_run_id": run.model_run_id,
                "spectral_norm": str(run.start.spectral_norm).lower()}
        created = self._client.create_run(self._experiment_id_for_runs(), tags=tags, run_name=run.trial_id)
        run_id = created.info.run_id
        params = {**run.start.hyperparams, "spectral_norm": run.start.spectral_norm, "dataset": run.start.dataset,
                  "model": run.start.model, "seed": run.start.seed,
                  "optuna_trial_number": run.start.optuna_trial_number, "paired_with": run.start.paired_with}
        from mlflow.entities import Param

        self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items() if v is not None])
        return run_id

    def _finish_run(self, run: _Run, status: str, state_dict: dict[str, torch.Tensor] | None) -> None:
        if state_dict is not None:
            with tempfile.TemporaryDirectory(prefix="sntrack-") as folder:
                path = Path(folder) / "state_dict.pt"
                torch.save(state_dict, path)
                self._client.log_artifact(run.run_id, str(path), artifact_path="model")
        self._client.set_terminated(run.run_id, TERMINAL_STATUS[status])


class _EventRecorder:
    """One trial's `TrialRecorder`: events, and MLflow through the worker's logger when there is one."""

    def __init__(self, tracker: Tracker, events: TrialEvents):
        self._tracker = tracker
        self._events = events
        self._lock = threading.Lock()
        self._held: list[Event] | None = None
        self._timer: threading.Timer | None = None
        self._run: _Run | None = None
        self._spectral_norm = False

    def started(self, payload: StartPayload) -> None:
        self._spectral_norm = payload.spectral_norm
        start = self._events.start(payload)
        mlflow = self._tracker.mlflow
        if mlflow is None or not mlflow.available:
            self._tracker.publish(start)
            return
        self._held = [start]
        self._tracker.pending.add(self)
        self._timer = threading.Timer(self._tracker.start_wait_s, self.release, args=(None,))
        self._timer.daemon = True
        self._timer.start()
        self._run = mlflow.begin(self._events.trial_id, self._events.model_run_id, payload, self.release)

    def epoch(self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None) -> None:
        event = self._events.metric(epoch, measurements, spectral_norms)
        self._emit(event)
        if self._run is not None:
            millis = int(event.occurred_at.timestamp() * 1000)
            self._tracker.mlflow.metrics(self._run, epoch, measurements, millis)

    def stopped(self, outcome: TrialOutcome, model: nn.Module | None) -> None:
        self._emit(self._events.stop(outcome.status, self._spectral_norm, outcome.measurements, outcome.error))
        if self._run is not None:
            state = state_dict_copy(model) if model is not None else None
            self._tracker.mlflow.end(self._run, outcome.status, state)

    def release(self, run_id: str | None) -> None:
        """Publish the held events, the start with `run_id`; the first call wins (run created, or time is up)."""
        with self._lock:
            if self._held is None:
                return
            start, *rest = self._held
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
            self._tracker.pending.discard(self)
            self._tracker.publish(_with_run_id(start, run_id) if run_id else start)
            for event in rest:
                self._tracker.publish(event)
        if run_id is None:
            log.info("trial started without an MLflow run id", trial_id=self._events.trial_id)

    def _emit(self, event: Event) -> None:
        with self._lock:
            if self._held is not None:
                self._held.append(event)
                return
            self._tracker.publish(event)


def _with_run_id(start: RunStarted, run_id: str) -> RunStarted:
    return start.model_copy(update={"payload": start.payload.model_copy(update={"mlflow_run_id": run_id})})


class Tracker:
    """The worker's reporting: an event publisher (anything with `publish(event)`) and an optional MLflowLogger."""

    def __init__(self, publisher, producer: ProducerInfo, mlflow: MlflowLogger | None = None,
                 start_wait_s: float = 2.0):
        self.publish = publisher.publish
        self.producer = producer
        self.mlflow = mlflow
        self.start_wait_s = start_wait_s
        self.pending: set[_EventRecorder] = set()

    def trial(self, trial_id: str, model_run_id: str) -> _EventRecorder:
        return _EventRecorder(self, TrialEvents(trial_id, model_run_id, self.producer))

    def close(self, timeout: float = 30.0) -> None:
        """Finish MLflow work within `timeout`, then release every trial's held events (null run id)."""
        if self.mlflow is not None and not self.mlflow.close(timeout):
            log.warning("MLflow work left unfinished at shutdown", timeout_s=timeout)
        for recorder in list(self.pending):
            recorder.release(None)
