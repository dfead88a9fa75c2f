"""The training worker through the real pipeline: Optuna on PostgreSQL, RabbitMQ, the journal and trials consumers.

A few epochs on the small `wine` data set keep each trial well under a second of training.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import sys
from asyncio.subprocess import PIPE
from collections import Counter
from urllib.parse import urlsplit

import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from common.postgres import drop_database
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.publisher import EventPublisher
from producer.search_space import SearchSpace
from producer.study import Worker, WorkerPlan, open_study, rdb_storage
from producer.tracking import MlflowLogger, Tracker
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.mlflow_server import free_port, mlflow_server, mlflow_settings  # noqa: F401

torch.set_num_threads(1)
optuna.logging.set_verbosity(optuna.logging.WARNING)

FAST = {"epochs": "3", "hidden": "16,32", "depth": "1:2", "batch_size": "32"}
SPACE_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]


@pytest.fixture
async def storage(env):
    """A per-test Optuna database beside the test's read-model database (Optuna has a `trials` table too)."""
    url = env.settings.database_url + "_optuna"
    yield url
    await asyncio.to_thread(drop_database, url)


def worker_command(env, storage: str, study: str, *args: str) -> tuple[list[str], dict[str, str]]:
    s = env.settings
    environ = {**os.environ, **s.to_env(), "SNTRACK_OPTUNA_STORAGE": storage, "SNTRACK_LOG_JSON": "true"}
    command = [sys.executable, "-m", "sntrack", "worker", "--study", study, "--dataset", "wine", *SPACE_FLAGS, *args]
    return command, environ


def run_study_in_process(env, storage: str, study_name: str, plan: WorkerPlan, *, settings=None,
                         overrides: dict | None = None, on_trial=None, mlflow: MlflowLogger | None = None,
                         start_wait_s: float = 5):
    settings = settings or env.settings
    study = open_study(storage, study_name, dataset="wine", split_seed=0)
    space = SearchSpace.load(overrides={**FAST, **(overrides or {})})
    with EventPublisher(settings.publisher()) as publisher:
        tracker = Tracker(publisher, producer_info("test-worker"), mlflow, start_wait_s=start_wait_s)
        result = Worker(study, space, plan, lambda trial_id: tracker.trial(trial_id, study_name),
                        on_trial=on_trial).run()
        tracker.close(30)
        assert publisher.drain(60), "events were not all confirmed after the broker came back"
    return study, result


async def projected(env, study_name: str, n: int) -> list:
    await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM trials WHERE model_run_id = $2 "
                                          "AND status <> 'running'", n, study_name), timeout=60, what="trials")
    return await env.fetch("SELECT * FROM trials WHERE model_run_id = $1 ORDER BY optuna_trial_number", study_name)


async def test_two_paired_workers_share_one_study(env, storage):
    """End to end with two worker processes: trial numbers unique, every trial projected with the flag, the
    hyper-parameters, the curve and the status Optuna recorded; pairs share seed and configuration."""
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        command, environ = worker_command(env, storage, "duo", "--n-trials", "3", "--design", "paired")
        procs = [await asyncio.create_subprocess_exec(*command, env=environ, stderr=PIPE) for _ in range(2)]
        outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 240)
        for proc, (_, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err.decode()[-2000:]
        study = optuna.load_study(study_name="duo", storage=rdb_storage(storage))
        trials = study.get_trials(deepcopy=False)
        # Each worker runs 3 trials, plus one when its last was a sampled one whose twin it still owes.
        assert len(trials) >= 6 and len(trials) % 2 == 0 and len({t.number for t in trials}) == len(trials)
        assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) for t in trials)
        rows = await projected(env, "duo", len(trials))

    by_number = {t.number: t for t in trials}
    state = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    for row in rows:
        trial = by_number[row["optuna_trial_number"]]
        assert row["id"] == trial.user_attrs["trial_id"]
        assert row["spectral_norm"] is trial.params["spectral_norm"]
        assert row["status"] == state[trial.state]
        hyperparams = json.loads(row["hyperparams"])
        assert {k: hyperparams[k] for k in ("hidden", "depth", "lr")} == {k: trial.params[k] for k in
                                                                           ("hidden", "depth", "lr")}
        assert hyperparams["epochs"] == 3 and row["mlflow_run_id"] is None
    curves = await env.fetch("SELECT trial_id, count(*) AS n, array_agg(spectral_norms ORDER BY epoch) AS norms "
                             "FROM trial_metrics GROUP BY trial_id")
    assert {c["trial_id"] for c in curves} == {r["id"] for r in rows} and all(c["n"] == 3 for c in curves)

    # SN at work: the SN arm's layers sit near 1, the baseline's are wherever training takes them.
    flags = {r["id"]: r["spectral_norm"] for r in rows}
    sn_values = [v for c in curves if flags[c["trial_id"]] for n in c["norms"] for v in json.loads(n).values()]
    free_values = [v for c in curves if not flags[c["trial_id"]] for n in c["norms"] for v in json.loads(n).values()]
    # SN's one power iteration per step lags the weights, most at a high learning rate early in training: the
    # bulk sits at 1, a few values above it.
    assert sn_values and all(0.9 < v < 2.0 for v in sn_values), sorted(sn_values)[:3] + sorted(sn_values)[-3:]
    assert statistics.median(sn_values) < 1.2, statistics.median(sn_values)
    assert any(abs(v - 1) > 0.2 for v in free_values)

    # Paired: every trial has its twin, same seed and configuration, the other flag.
    by_id = {r["id"]: r for r in rows}
    assert all(r["paired_with"] in by_id for r in rows)
    for row in rows:
        twin = by_id[row["paired_with"]]
        assert twin["paired_with"] == row["id"] and twin["spectral_norm"] is not row["spectral_norm"]
        assert twin["seed"] == row["seed"] and twin["hyperparams"] == row["hyperparams"]
    assert Counter(r["spectral_norm"] for r in rows) == {True: len(rows) // 2, False: len(rows) // 2}


async def test_broker_outage_mid_study_loses_nothing(env, storage):
    """The broker goes away after the first trial: training goes on (events spool), and after it returns every
    event reaches the journal and every trial the read model."""
    broker = urlsplit(env.settings.amqp_url)
    proxy = TcpProxy(broker.hostname, broker.port)
    settings = env.settings.replace(amqp_url=proxy.url_for(env.settings.amqp_url))

    def on_trial(result):  # trials 2 and 3 train while the broker is unreachable
        if result.trials == 1:
            proxy.cut()
        elif result.trials == 3:
            proxy.restore()

    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        _, result = await asyncio.to_thread(run_study_in_process, env, storage, "outage", WorkerPlan(4),
                                            settings=settings, on_trial=on_trial)
        assert result.trials == 4
        rows = await projected(env, "outage", 4)
        expected = sum(int(json.loads(r["metrics"])["epochs_completed"]) + 2 for r in rows)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", expected), what="journal")
    proxy.close()
    assert await env.fetchval("SELECT count(*) FROM trial_metrics") == expected - 8
    assert await env.fetchval("SELECT count(DISTINCT (trial_id, seq)) FROM events") == expected


async def test_nan_configuration_ends_failed_not_crashed(env, storage):
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        study, result = await asyncio.to_thread(
            run_study_in_process, env, storage, "nan", WorkerPlan(2),
            overrides={"lr": "1e12", "spectral_norm": "false"})
        rows = await projected(env, "nan", 2)
    assert result.statuses == {"failed": 2}
    assert {(r["status"], r["error_type"]) for r in rows} == {("failed", "nan_loss")}
    assert {t.state for t in study.get_trials(deepcopy=False)} == {TrialState.FAIL}


async def test_sigterm_stops_the_running_trial_as_interrupted(env, storage):
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        command, environ = worker_command(env, storage, "term", "--n-trials", "50", "--epochs", "400")
        proc = await asyncio.create_subprocess_exec(*command, env=environ, stderr=PIPE)
        await wait_until(lambda: env.fetchval("SELECT count(*) > 0 FROM trial_metrics"), timeout=90,
                         what="the first epoch")
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        rows = await projected(env, "term", 1)
    assert (rows[0]["status"], rows[0]["error_type"]) == ("failed", "interrupted")
    trials = optuna.load_study(study_name="term", storage=rdb_storage(storage)).get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL]


async def test_mlflow_runs_from_the_training_side(env, storage, mlflow_server, monkeypatch):  # noqa: F811
    """Each trial's MLflow run: id in the start event, tags, params, the per-epoch series, the state_dict."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    settings = mlflow_settings(env.settings, mlflow_server)
    logger = MlflowLogger(settings.mlflow_tracking_uri, settings.mlflow_experiment)
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        await asyncio.to_thread(run_study_in_process, env, storage, "tracked", WorkerPlan(2), mlflow=logger)
        rows = await projected(env, "tracked", 2)
    client = MlflowClient(settings.mlflow_tracking_uri)
    for row in rows:
        assert row["mlflow_run_id"], "the start event carries the run id"
        run = client.get_run(row["mlflow_run_id"])
        assert run.data.tags["trial_id"] == row["id"] and run.data.tags["model_run_id"] == "tracked"
        assert run.data.tags["spectral_norm"] == str(row["spectral_norm"]).lower()
        assert run.data.params["seed"] == str(row["seed"]) and run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [0, 1, 2]
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/state_dict.pt"]


async def test_unreachable_mlflow_never_stalls_training(env, storage, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    logger = MlflowLogger(f"http://127.0.0.1:{free_port()}", "nowhere")
    async with running_consumers(env.settings.consumer(), ["journal", "trials"]):
        _, result = await asyncio.to_thread(run_study_in_process, env, storage, "untracked", WorkerPlan(2),
                                            mlflow=logger)
        rows = await projected(env, "untracked", 2)
    assert result.statuses == {"completed": 2}
    assert [r["mlflow_run_id"] for r in rows] == [None, None]
