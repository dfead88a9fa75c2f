"""An Optuna study on PostgreSQL shared by any number of workers, and the loop one worker runs on it.

Creation is race-free: workers serialise on a PostgreSQL advisory lock while they create the storage database,
Optuna's tables and the study (`load_if_exists=True`); trial numbers come from the storage, so they never
collide. The paired design enqueues, for every configuration the sampler proposes, its twin (same parameters and
seed, the other flag); `Study.ask()` hands out waiting trials first, so twins are run next, by whichever worker asks.

A trial's lifecycle keeps Optuna and the events in step:

- Optuna is told a trial is over (COMPLETE / PRUNED / FAIL) only after every event of the trial, its stop
  included, is confirmed by the broker or fsync'ed in the spool (`TrialRecorder.settle`), so a SIGKILL at any
  later moment loses nothing a finished trial needs
  (tests/test_worker_kills.py::test_sigkill_right_after_optuna_records_the_trial_finds_its_stop_spooled).
- While it runs, the trial beats Optuna's heartbeat (with `Heartbeat` given to `open_study`). Before every trial a
  worker fails the study's trials whose heartbeat went stale (`optuna.storages.fail_stale_trials`), and its
  `on_lost` callback publishes each a failed stop with error `worker_lost` (`lost_trial_stop`)
  (tests/test_worker_kills.py::test_a_trial_whose_worker_was_killed_is_reported_lost_by_another_worker).
"""

from __future__ import annotations

import dataclasses
import threading
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import optuna
import structlog
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState

from common.errors import ConfigurationError
from common.postgres import admin_cursor, create_database
from common.urls import path_name
from producer.emitter import TrialEvents
from producer.search_space import SearchSpace
from producer.training import TrialConfig, TrialOutcome, TrialRecorder, run_trial
from schemas import ProducerInfo, RunError, RunStopped

log = structlog.get_logger("sntrack.worker")

Design = Literal["paired", "independent"]
DEFAULT_DATASET = "digits"
OPTUNA_STATE = {"completed": TrialState.COMPLETE, "pruned": TrialState.PRUNED, "failed": TrialState.FAIL}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StudyError(ValueError):
    """The study cannot be opened as asked (a message for the user)."""


@dataclass(frozen=True)
class Heartbeat:
    """Optuna's heartbeat for this process's trials (stale after 2 intervals, Optuna's grace period), and what to
    do with a trial of the study whose worker stopped beating: `on_lost(study, trial)`, once Optuna failed it."""

    interval_s: int
    on_lost: Callable[[optuna.Study, FrozenTrial], None]


def sqlalchemy_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3; we ship psycopg2."""
    scheme, sep, rest = url.partition("://")
    return f"postgresql+psycopg2{sep}{rest}" if scheme in ("postgresql", "postgres") else url


def rdb_storage(url: str, heartbeat: Heartbeat | None = None) -> optuna.storages.RDBStorage:
    """Optuna's storage at `url`."""
    url = sqlalchemy_url(url)
    if heartbeat is None:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                          heartbeat_interval=heartbeat.interval_s,
                                          heartbeat_stale_trial_callback=heartbeat.on_lost)


def open_study(storage_url: str, name: str, *, dataset: str | None, split_seed: int,
               pruner: optuna.pruners.BasePruner | None = None, heartbeat: Heartbeat | None = None) -> optuna.Study:
    """Load or create study `name` (maximising final validation accuracy), creating the database if needed.

    A study is bound to one dataset and one train/validation split (recorded as study attributes at creation);
    a worker that asks for another one is refused rather than mixing incomparable trials; `dataset=None` takes the
    study's own (tests/test_studies.py::test_study_remembers_its_settings)."""
    if not storage_url.startswith("postgres"):
        return _load(rdb_storage(storage_url, heartbeat), name, dataset, split_seed, pruner)
    lock = zlib.crc32(f"sntrack-optuna:{path_name(storage_url)}".encode())
    try:
        with admin_cursor(storage_url) as cur:  # closing it ends the session, which releases the advisory lock
            cur.execute("SELECT pg_advisory_lock(%s)", (lock,))
            create_database(storage_url)
            return _load(rdb_storage(storage_url, heartbeat), name, dataset, split_seed, pruner)
    except ConfigurationError as exc:
        raise StudyError(f"cannot reach the Optuna storage server: {exc}") from None


def _load(storage: optuna.storages.BaseStorage, name: str, dataset: str | None, split_seed: int,
          pruner: optuna.pruners.BasePruner | None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(), pruner=pruner or optuna.pruners.NopPruner())
    dataset = dataset or study.user_attrs.get("dataset") or DEFAULT_DATASET
    for key, value in (("dataset", dataset), ("split_seed", split_seed)):
        recorded = study.user_attrs.get(key)
        if recorded is None:
            study.set_user_attr(key, value)
        elif recorded != value:
            raise StudyError(f"study {name!r} runs on {key} {recorded!r}, not {value!r}")
    return study


def adopt_space(study: optuna.Study, space: SearchSpace, given: set[str]) -> SearchSpace:
    """The search space the study was created with, stored in its user attrs at creation (this `space` when the
    study is new). A dimension set explicitly (`given`) that differs from the stored one is refused, naming the
    stored value, rather than mixing trials of different settings (tests/test_studies.py)."""
    stored = study.user_attrs.get("search_space")
    if stored is None:
        study.set_user_attr("search_space", space.to_tables())
        return space
    kept = SearchSpace.from_tables(stored)
    for name in sorted(given):
        if name in kept.dimensions and space.dimensions[name] != kept.dimensions[name]:
            flag = f"--{name.replace('_', '-')}"
            raise StudyError(f"study {study.study_name!r} was created with {flag} {kept.dimensions[name].spec}, not "
                             f"{space.dimensions[name].spec}; leave {flag} out or start another study")
    return kept


@dataclass(frozen=True)
class WorkerPlan:
    n_trials: int
    design: Design = "independent"
    seed: int = 0
    budget: int | None = None  # the study's total number of trials, all workers together


@dataclass
class WorkerResult:
    statuses: Counter = dataclasses.field(default_factory=Counter)
    interrupted: bool = False

    @property
    def trials(self) -> int:
        return sum(self.statuses.values())


class Worker:
    """Runs trials of `study` until the plan is done or `stop` is set; reports each to `recorder_for(trial_id)`."""

    def __init__(self, study: optuna.Study, space: SearchSpace, plan: WorkerPlan,
                 recorder_for: Callable[[str], TrialRecorder], *, stop: threading.Event | None = None,
                 on_trial: Callable[[WorkerResult], None] | None = None, pruning: bool = False):
        if plan.design == "paired" and not space.searches_the_flag:
            raise StudyError("the paired design needs spectral_norm choices [true, false]")
        self.study = study
        self.space = space
        self.plan = plan
        self.recorder_for = recorder_for
        self.stop = stop or threading.Event()
        self.on_trial = on_trial
        self.pruning = pruning

    def run(self) -> WorkerResult:
        result = WorkerResult()
        owes_twin = False  # a twin was enqueued: ask once more, so no twin is left waiting when workers stop
        while not self.stop.is_set() and (owes_twin or (result.trials < self.plan.n_trials and self._in_budget())):
            self._fail_lost_trials()
            with warnings.catch_warnings():  # "heartbeat is supposed to be used with optimize": we beat below
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            # Optuna's own optimize() beats this way; ask-and-tell has no public equivalent.
            with get_heartbeat_thread(trial._trial_id, self.study._storage):
                config, trial_id, paired_with = self._configure(trial)
                owes_twin = self.plan.design == "paired" and "paired_with" not in trial.user_attrs
                if owes_twin:
                    paired_with = self._enqueue_twin(trial, config, trial_id)
                outcome = self._run(trial, config, trial_id, paired_with)
            result.statuses[outcome.status] += 1
            if self.on_trial is not None:
                self.on_trial(result)
            if outcome.interrupted:
                result.interrupted = True
                break
        return result

    def _fail_lost_trials(self) -> None:
        """Fail the study's trials whose worker stopped beating; the storage's `on_lost` reports each."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)

    def _in_budget(self) -> bool:
        if self.plan.budget is None:
            return True
        started = self.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        return len(started) < self.plan.budget

    def _configure(self, trial: optuna.Trial) -> tuple[TrialConfig, str, str | None]:
        sampled = self.space.sample(trial)  # for a twin these are its enqueued parameters
        attrs = trial.user_attrs
        if "config" in attrs:  # a twin: its whole configuration was fixed by the trial it pairs with
            return TrialConfig(**attrs["config"]), attrs["trial_id"], attrs["paired_with"]
        study_attrs = self.study.user_attrs
        config = TrialConfig(**sampled, seed=self.plan.seed + trial.number, dataset=study_attrs["dataset"],
                             split_seed=study_attrs["split_seed"])
        trial_id = f"{self.study.study_name}-{uuid.uuid4().hex[:12]}"
        trial.set_user_attr("trial_id", trial_id)
        trial.set_user_attr("config", dataclasses.asdict(config))
        return config, trial_id, None

    def _enqueue_twin(self, trial: optuna.Trial, config: TrialConfig, trial_id: str) -> str:
        twin_id = f"{self.study.study_name}-{uuid.uuid4().hex[:12]}"
        twin = dataclasses.replace(config, spectral_norm=not config.spectral_norm)
        self.study.enqueue_trial({**trial.params, "spectral_norm": twin.spectral_norm}, user_attrs={
            "trial_id": twin_id, "paired_with": trial_id, "config": dataclasses.asdict(twin)})
        trial.set_user_attr("paired_with", twin_id)
        return twin_id

    def _run(self, trial: optuna.Trial, config: TrialConfig, trial_id: str, paired_with: str | None) -> TrialOutcome:
        def should_prune(epoch: int, val_accuracy: float) -> bool:
            trial.report(val_accuracy, epoch)
            return trial.should_prune()

        log.info("trial started", trial_id=trial_id, optuna_trial_number=trial.number,
                 spectral_norm=config.spectral_norm, paired_with=paired_with)
        recorder = self.recorder_for(trial_id)
        outcome = run_trial(config, recorder, optuna_trial_number=trial.number,
                            paired_with=paired_with, should_prune=should_prune if self.pruning else None,
                            stop=self.stop)
        recorder.settle()  # Optuna must not record the trial as over before its stop is confirmed or spooled
        try:
            if outcome.error is not None:
                trial.set_user_attr("error", f"{outcome.error.type}: {outcome.error.message}")
            if outcome.status == "completed":
                self.study.tell(trial, outcome.measurements["final_val_accuracy"], skip_if_finished=True)
            else:
                self.study.tell(trial, state=OPTUNA_STATE[outcome.status], skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            # This process stalled past the heartbeat's grace period and another worker reported the trial lost.
            log.warning("the trial was already failed as lost by another worker", trial_id=trial_id)
        log.info("trial finished", trial_id=trial_id, optuna_trial_number=trial.number, status=outcome.status,
                 error=outcome.error.type if outcome.error else None,
                 val_accuracy=outcome.measurements.get("final_val_accuracy"))
        return outcome


def lost_trial_stop(trial: FrozenTrial, model_run_id: str, producer: ProducerInfo) -> RunStopped | None:
    """The failed stop (error `worker_lost`) for a trial whose worker died; None when it never got as far as
    publishing anything (no trial_id or configuration yet).

    Its seq is `epochs + 2`, one above the largest seq the dead worker could have used (start 0, one metric per
    epoch, stop epochs + 1), computed from the configuration already in Optuna, so no per-event write to Optuna is
    needed and the lost stop is the trial's last event by seq whatever the dead worker got out."""
    attrs = trial.user_attrs
    if "trial_id" not in attrs or "config" not in attrs:
        return None
    config = TrialConfig(**attrs["config"])
    events = TrialEvents(attrs["trial_id"], model_run_id, producer, next_seq=config.epochs + 2)
    message = (f"the worker running Optuna trial {trial.number} stopped beating its heartbeat; "
               f"failed by worker {producer.worker_id}")
    return events.stop("failed", config.spectral_norm, {}, RunError(type="worker_lost", message=message))
