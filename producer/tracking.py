"""What a trial reports, and where: sntrack events (always) and MLflow (optional), never on the training path.

`Tracker` is one per worker; `tracker.trial(trial_id, model_run_id)` gives the `TrialRecorder` that
`producer.training.run_trial` reports to. Every recorder method returns at once:

- events are built on the training thread (seq, occurred_at) and handed to the publisher, which never blocks;
- all MLflow calls run on one background thread (`MlflowLogger`): create the run, params, the per-epoch
  series (batched: sent every METRICS_FLUSH_S and when the trial ends, one `log_batch` per run), the
  `state_dict` artifact and the terminal status. A slow MLflow server makes the series arrive later, never
  the training slower;
- the start event must carry the MLflow run id, so a trial's events are held (in order, in memory) until the
  background thread has created the run, for at most `start_wait_s`; then they go out with a null run id. After
  an MLflow failure the logger rests for `COOLDOWN_S` (trials meanwhile carry a null run id at once) instead of
  waiting on a dead server per trial.

One run per trial, whatever the timing (docs/mlflow.md, "One run per trial"): the start event decides who owns
the run. The background thread creates the run without any tag (nobody can find it by `trial_id`) and offers its
id to the held start. Accepted (the start goes out with it): the run is tagged and gets the params. Refused (the
start already went out without an id, so the `mlflow` consumer creates the run): the untagged run, which nobody
knows, is deleted, and the worker adopts the consumer's run, found by tag, for its model artifact (for up to
ADOPT_WAIT_S). Proved by tests/test_mlflow_identity.py::test_slow_mlflow_gives_one_run_per_trial.
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

from common.errors import ConfigurationError
from common.urls import redact, scrub
from producer.emitter import TrialEvents
from producer.model import state_dict_copy
from producer.training import TrialOutcome
from schemas import Event, ProducerInfo, RunStarted, StartPayload
from schemas.mlflow import (
    epoch_metrics,
    experiment_name,
    run_name,
    tracking_uri_problem,
    trial_params,
    trial_tags,
)

log = structlog.get_logger("sntrack.worker")

COOLDOWN_S = 30.0
# The per-epoch series goes out at most this often (and when the trial ends): every MLflow call costs the training
# thread CPU and GIL time on a small machine even from a background thread (measured: docs/worker.md).
METRICS_FLUSH_S = 5.0
QUEUE_LIMIT = 10_000  # MLflow work items waiting; beyond that MLflow logging is dropped, training never waits
TERMINAL_STATUS = {"completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}
ADOPT_WAIT_S = 120.0  # how long a refused trial's artifact waits for the consumer's run to appear
ADOPT_RETRY_S = 2.0


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
    on_run_id: Callable[[str | None], bool]  # True: the start went out with this run id
    run_id: str | None = None
    pending_metrics: list = field(default_factory=list)


@dataclass(eq=False)
class _Adoption:
    """A refused trial's artifact, waiting for the consumer's run to appear."""

    run: _Run
    state_dict: dict[str, torch.Tensor]
    give_up_at: float
    next_try: float = 0.0


class MlflowLogger:
    """A daemon thread that owns every MLflow call of the worker."""

    def __init__(self, tracking_uri: str, experiment: str):
        """`experiment` is a name or a template with `{study}` (schemas.mlflow.experiment_name)."""
        if problem := tracking_uri_problem(tracking_uri):
            raise ConfigurationError(problem)
        # MLflow's client prints "🏃 View run …" to stdout after every run; the worker's terminal is for its progress.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        from mlflow.tracking import MlflowClient  # here: a worker without MLflow never pays its ~2 s import

        self._client = MlflowClient(tracking_uri)
        self._experiment_ids: dict[str, str] = {}
        self._adopting: list[_Adoption] = []
        self._down_until = 0.0
        self._queue: queue.Queue = queue.Queue(QUEUE_LIMIT)
        self._thread = threading.Thread(target=self._main, name="sntrack-mlflow", daemon=True)
        self._thread.start()

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def begin(self, trial_id: str, model_run_id: str, start: StartPayload,
              on_run_id: Callable[[str | None], bool]) -> _Run:
        run = _Run(trial_id, model_run_id, start, on_run_id)
        if not self._submit(("begin", run)):
            on_run_id(None)
        return run

    def metrics(self, run: _Run, epoch: int, values: dict[str, float], timestamp_ms: int) -> None:
        """One epoch's series (schemas.mlflow.epoch_metrics), logged at step = epoch."""
        self._submit(("metrics", run, epoch, values, timestamp_ms))

    def end(self, run: _Run, status: str, state_dict: dict[str, torch.Tensor] | None) -> None:
        self._submit(("end", run, status, state_dict))

    def sync(self, timeout: float) -> bool:
        """Wait until everything queued so far has been sent (or given up). True when it was, within `timeout`."""
        done = threading.Event()
        return self._submit(("sync", done)) and done.wait(timeout)

    def close(self, timeout: float) -> bool:
        """Let the thread finish what is queued (artifacts waiting for the consumer's run included, until shortly
        before `timeout`), within `timeout`. True when it did."""
        try:
            self._queue.put(("close", time.monotonic() + 0.9 * timeout), timeout=timeout)
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
            wake = [flush_at] if waiting else []
            wake += [a.next_try for a in self._adopting]
            try:
                item = self._queue.get(timeout=max(0.0, min(wake) - time.monotonic()) if wake else None)
            except queue.Empty:  # time to send what was collected: one call per run, however many epochs
                if waiting and time.monotonic() >= flush_at:
                    self._flush_metrics(waiting)
                    waiting = []
                self._adopt()
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
                while self._adopting and time.monotonic() < item[1]:
                    time.sleep(max(0.0, min(min(a.next_try for a in self._adopting), item[1]) - time.monotonic()))
                    self._adopt()
                if self._adopting:
                    log.warning("closing with model artifacts not uploaded: the consumer's runs did not appear",
                                trials=[a.run.trial_id for a in self._adopting])
                return
            if item[0] == "sync":
                item[1].set()
            elif item[0] == "begin":
                if not self._call("create the run", self._begin_run, item[1]):
                    item[1].on_run_id(None)  # MLflow failed or rests: let the start go now (no-op if it went)
            elif item[1].run_id is not None:
                self._call("finish the run", self._finish_run, *item[1:])
            elif item[3] is not None:  # the start went out without our run: the consumer's run gets the model
                self._adopting.append(_Adoption(item[1], item[3], time.monotonic() + ADOPT_WAIT_S))
                self._adopt()

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
            log.warning(f"MLflow: could not {what}; training goes on, MLflow rests",
                        tracking_uri=redact(self.tracking_uri), cooldown_s=COOLDOWN_S,
                        error=scrub(f"{type(exc).__name__}: {exc}", self.tracking_uri)[:300])
            return None

    def _experiment_id(self, model_run_id: str) -> str:
        name = experiment_name(self.experiment, model_run_id)
        if name not in self._experiment_ids:
            found = self._client.get_experiment_by_name(name)
            if found is None:
                try:
                    self._experiment_ids[name] = self._client.create_experiment(name)
                except Exception:  # another worker (or the consumer) created it first
                    found = self._client.get_experiment_by_name(name)
                    if found is None:
                        raise
            self._experiment_ids.setdefault(name, found.experiment_id if found else "")
        return self._experiment_ids[name]

    def _begin_run(self, run: _Run) -> bool:
        """Create the run untagged, offer it to the start event; tag it when accepted, delete it when refused."""
        start = run.start
        created = self._client.create_run(self._experiment_id(run.model_run_id),
                                          run_name=run_name(run.trial_id, start.spectral_norm))
        if not run.on_run_id(created.info.run_id):
            self._client.delete_run(created.info.run_id)  # untagged and never announced: nobody else holds it
            log.info("the trial's start went out without a run id; its MLflow run is the consumer's",
                     trial_id=run.trial_id)
            return True
        run.run_id = created.info.run_id
        from mlflow.entities import Param, RunTag

        # No status tag yet: the consumer may already have set the final one (it is set again when the run ends).
        tags = trial_tags(run.trial_id, run.model_run_id, start.spectral_norm, None)
        self._client.log_batch(run.run_id, params=[Param(k, v) for k, v in trial_params(start).items()],
                               tags=[RunTag(k, v) for k, v in tags.items()])
        return True

    def _find_run(self, run: _Run) -> str | None:
        runs = self._client.search_runs([self._experiment_id(run.model_run_id)], f"tags.trial_id = '{run.trial_id}'")
        return runs[0].info.run_id if runs else None

    def _adopt(self) -> None:
        """Upload waiting artifacts to the consumer's runs that have appeared; give up on the overdue ones."""
        now, still = time.monotonic(), []
        for adoption in self._adopting:
            if adoption.next_try > now:
                still.append(adoption)
                continue
            run = adoption.run
            found = self._call("find the consumer's run", self._find_run, run)
            if found:
                run.run_id = found
                self._call("upload the model", self._log_model, run.run_id, adoption.state_dict)
            elif now < adoption.give_up_at:
                adoption.next_try = now + ADOPT_RETRY_S
                still.append(adoption)
            else:
                log.warning("no MLflow run appeared for the trial; its model artifact is not uploaded",
                            trial_id=run.trial_id, waited_s=ADOPT_WAIT_S)
        self._adopting = still

    def _finish_run(self, run: _Run, status: str, state_dict: dict[str, torch.Tensor] | None) -> None:
        if state_dict is not None:
            self._log_model(run.run_id, state_dict)
        self._client.set_tag(run.run_id, "status", status)
        self._client.set_terminated(run.run_id, TERMINAL_STATUS[status])

    def _log_model(self, run_id: str, state_dict: dict[str, torch.Tensor]) -> None:
        with tempfile.TemporaryDirectory(prefix="sntrack-") as folder:
            path = Path(folder) / "state_dict.pt"
            torch.save(state_dict, path)
            self._client.log_artifact(run_id, str(path), artifact_path="model")


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
        self._released = threading.Event()  # no event held back for the MLflow run id any more

    def started(self, payload: StartPayload) -> None:
        self._spectral_norm = payload.spectral_norm
        start = self._events.start(payload)
        mlflow = self._tracker.mlflow
        if mlflow is None or not mlflow.available:
            self._tracker.publish(start)
            self._released.set()
            return
        self._held = [start]
        self._tracker.pending.add(self)
        self._timer = threading.Timer(self._tracker.start_wait_s, self.release, args=(None,))
        self._timer.daemon = True
        self._timer.start()
        self._run = mlflow.begin(self._events.trial_id, self._events.model_run_id, payload, self.release)

    def epoch(self, epoch: int, measurements: dict[str, float], spectral_norms: dict[str, float] | None,
              step: int | None = None) -> None:
        event = self._events.metric(epoch, measurements, spectral_norms, step)
        self._emit(event)
        if self._run is not None:
            millis = int(event.occurred_at.timestamp() * 1000)
            self._tracker.mlflow.metrics(self._run, epoch, epoch_metrics(event.payload), millis)

    def stopped(self, outcome: TrialOutcome, model: nn.Module | None) -> None:
        self._emit(self._events.stop(outcome.status, self._spectral_norm, outcome.measurements, outcome.error))
        if self._run is not None:
            state = state_dict_copy(model) if model is not None else None
            self._tracker.mlflow.end(self._run, outcome.status, state)

    def release(self, run_id: str | None) -> bool:
        """Publish the held events, the start with `run_id`; the first call wins (run created, or time is up).
        True when this call published them."""
        with self._lock:
            if self._held is None:
                return False
            start, *rest = self._held
            self._held = None
            if self._timer is not None:
                self._timer.cancel()
            self._tracker.pending.discard(self)
            self._tracker.publish(_with_run_id(start, run_id) if run_id else start)
            for event in rest:
                self._tracker.publish(event)
            self._released.set()
        if run_id is None:
            log.info("trial started without an MLflow run id", trial_id=self._events.trial_id)
        return True

    def settle(self) -> None:
        """Wait until this trial's events are confirmed or spooled (held ones first go out, within start_wait_s)."""
        self._released.wait()
        self._tracker.settle()

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
        self._publisher = publisher
        self.producer = producer
        self.mlflow = mlflow
        self.start_wait_s = start_wait_s
        self.pending: set[_EventRecorder] = set()

    def settle(self) -> None:
        """Wait until everything published so far is confirmed by the broker or in the fsync'ed spool."""
        self._publisher.flush()

    def trial(self, trial_id: str, model_run_id: str) -> _EventRecorder:
        return _EventRecorder(self, TrialEvents(trial_id, model_run_id, self.producer))

    def close(self, timeout: float = 30.0) -> None:
        """Finish MLflow work within `timeout`, then release every trial's held events (null run id)."""
        if self.mlflow is not None and not self.mlflow.close(timeout):
            log.warning("MLflow work left unfinished at shutdown", timeout_s=timeout)
        for recorder in list(self.pending):
            recorder.release(None)
