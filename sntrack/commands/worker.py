"""sntrack worker --study NAME --n-trials N — train trials of a shared Optuna study and publish what happens."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import structlog

from common.errors import ConfigurationError
from common.urls import redact
from producer.config import DATASETS
from producer.search_space import SEARCHABLE, Dimension, SearchSpace, SearchSpaceError
from schemas.events import ALL_SEARCHES
from sntrack.health import amqp_refusal_now
from sntrack.ops import add_metrics_port, ops_server
from sntrack.progress import EpochCounter, Progress
from sntrack.settings import Settings

log = structlog.get_logger("sntrack.worker")



WORKER_EXTRA_MISSING = ("the worker needs the worker extra (torch, optuna, scikit-learn): "
                        "pip install 'sntrack[worker]'")


def _spec_of(dimension: Dimension) -> Callable[[str], str]:
    """An argparse type checking a SPEC for `dimension` at parse time; the SPEC itself is kept."""
    def check(spec: str) -> str:
        try:
            dimension.override(spec)
        except SearchSpaceError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return spec
    return check


def _most_epochs(space: SearchSpace) -> int:
    """The epochs a trial trains at most, for the progress bar's total."""
    d = space.dimensions["epochs"]
    return int(d.value if d.value is not None else d.high if d.high is not None else max(d.choices or (1,)))


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "worker", help="train trials of an Optuna study (spectral norm on/off) and publish their events",
        description="Run trials of an Optuna study stored in PostgreSQL until this worker has run --n-trials (or "
        "the study has --budget trials). Any number of workers may share a study. Each trial trains an MLP on a "
        "scikit-learn dataset, publishes start/metric/stop events and logs to MLflow off the training thread. "
        "SIGTERM/SIGINT stop the running trial as failed/interrupted and exit once its events are confirmed or "
        "spooled. Search-space defaults: producer/search_space.toml; each dimension's flag takes V (fixed), "
        "A,B,C (choices) or LOW:HIGH[:log|:linear] (range).",
)
    parser.add_argument("--study", required=True, help="study name (also the events' model_run_id)")
    parser.add_argument("--n-trials", type=int, default=10, help="trials this worker runs (default 10)")
    parser.add_argument("--budget", type=int, help="stop when the study as a whole has this many trials")
    parser.add_argument("--design", choices=("independent", "paired"), default="independent",
                        help="paired: every sampled configuration also runs with the other flag, same seed")
    parser.add_argument("--dataset", choices=DATASETS,
                        help="scikit-learn dataset; a new study defaults to digits, an existing one keeps its own")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed (default 0): the study's train/val split; trial n's seed is SEED + n")
    parser.add_argument("--pruner", choices=("none", "median"), default="none",
                        help="median: stop a trial whose validation accuracy is below the median of earlier trials "
                        "at the same epoch (default none)")
    parser.add_argument("--storage", help="Optuna RDB storage URL (default: $SNTRACK_OPTUNA_STORAGE)")
    parser.add_argument("--no-mlflow", action="store_true", help="no MLflow logging (start events: null run id)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a small MLP gains little from more, and several "
                        "workers on one machine oversubscribe the cores)")
    parser.add_argument("--search-space", type=Path, metavar="FILE", help="TOML search space replacing the default")
    space = parser.add_argument_group("search-space overrides", "SPEC: V | A,B,C | LOW:HIGH[:log|:linear]")
    for name, dimension in SearchSpace.load().dimensions.items():
        space.add_argument(f"--{name.replace('_', '-')}", metavar="SPEC", dest=f"space_{name}",
                           type=_spec_of(dimension), help=f"default {dimension.spec}")
    add_metrics_port(parser)
    parser.set_defaults(run=_worker)


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    # Imported here: torch, optuna and mlflow take seconds to load, and no other command needs them.
    try:
        import optuna
        import sklearn  # noqa: F401 - the datasets (producer.data); checked here so the error names the extra
        import torch
    except ModuleNotFoundError:
        raise ConfigurationError(WORKER_EXTRA_MISSING) from None

    from producer.metrics import WorkerHealth, worker_registry
    from producer.publisher import SpoolFull
    from producer.service import WorkerConfig, WorkerMlflowConfig, WorkerSession, stop_on_signals
    from producer.study import StudyError, Worker, WorkerPlan, adopt_space, open_study

    optuna.logging.set_verbosity(logging.WARNING)
    torch.set_num_threads(max(1, args.threads))
    overrides = {name: getattr(args, f"space_{name}") for name in SEARCHABLE}
    if args.study == ALL_SEARCHES:
        raise ConfigurationError(f"--study {ALL_SEARCHES!r} is reserved (it names the aggregate over all studies)")
    if refusal := asyncio.run(amqp_refusal_now(settings)):  # before the Optuna study is created
        raise ConfigurationError(refusal)
    storage = args.storage or settings.optuna_storage
    mlflow = (WorkerMlflowConfig(settings.mlflow_tracking_uri, settings.mlflow_experiment, settings.mlflow_timeout_s,
                                 settings.mlflow_start_wait_s)
              if settings.mlflow_enabled and not args.no_mlflow else None)
    session = WorkerSession(WorkerConfig(settings.publisher(), settings.worker_heartbeat_s, mlflow, settings.worker_id))

    try:
        space = SearchSpace.load(args.search_space, overrides)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2) if args.pruner == "median" else None
        study = open_study(storage, args.study, dataset=args.dataset, split_seed=args.seed, pruner=pruner,
                           heartbeat=session.heartbeat())
        given = set(SEARCHABLE) if args.search_space else {n for n, spec in overrides.items() if spec is not None}
        space = adopt_space(study, space, given)
    except (SearchSpaceError, StudyError) as exc:
        raise ConfigurationError(str(exc)) from None
    stop = stop_on_signals()
    with session, ops_server(args, settings, worker_registry(session.publisher, settings.spool_dir),
                             WorkerHealth(session.publisher, storage)):
        log.info("worker starting", study=args.study, storage=redact(storage), design=args.design,
                 dataset=study.user_attrs["dataset"], n_trials=args.n_trials,
                 mlflow=mlflow and redact(mlflow.tracking_uri))
        tracker = session.tracker
        plan = WorkerPlan(args.n_trials, args.design, args.seed, args.budget)
        try:
            epochs = _most_epochs(space)
            finished = [0]
            with Progress(f"study {args.study}", unit="epochs", total=args.n_trials * epochs) as progress:
                def recorder(trial_id: str) -> EpochCounter:
                    return EpochCounter(progress, tracker.trial(trial_id, args.study), epochs,
                                        lambda: f"trial {finished[0] + 1}/{args.n_trials}")

                def on_trial(result) -> None:
                    finished[0] = result.trials
                    if result.trials > args.n_trials:  # a paired worker finishing a twin it owes
                        progress.update(progress.bar.n, result.trials * epochs)

                worker = Worker(study, space, plan, recorder, stop=stop, pruning=pruner is not None,
                                on_trial=on_trial)
                result = worker.run()
        except StudyError as exc:
            raise ConfigurationError(str(exc)) from None
        except SpoolFull as exc:
            print(f"sntrack: {exc}", file=sys.stderr)
            return 1
    stats, delivered = session.stats, session.delivered
    log.info("worker finished", trials=result.trials, **dict(result.statuses), interrupted=result.interrupted,
             events_confirmed=stats.confirmed + stats.flushed_from_spool, events_spooled=stats.spooled,
             all_events_confirmed_or_spooled=delivered)
    print(f"{args.study}: {result.trials} trials ({', '.join(f'{n} {s}' for s, n in result.statuses.items())})"
          + (" — interrupted" if result.interrupted else ""), file=sys.stderr)
    return 0
