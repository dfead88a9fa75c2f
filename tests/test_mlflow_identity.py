"""Exactly one MLflow run per trial under every timing, and runs that read well (issues 8 and 16), against the real
MLflow server, broker and database."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter

import requests
from mlflow.tracking import MlflowClient

from consumers.mlflow.client import MlflowRest
from consumers.mlflow.reconcile import reconcile
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from producer.study import WorkerPlan
from producer.tracking import MlflowLogger
from schemas.mlflow import experiment_name
from tests.conftest import wait_until
from tests.faults import TcpProxy
from tests.mlflow_server import mlflow_server, mlflow_settings  # noqa: F401
from tests.test_mlflow import PIPELINE, metrics_of, mlflow_post, publish, tags_of
from tests.test_worker_pipeline import run_study_in_process, storage  # noqa: F401

BASE_API = "/api/2.0/mlflow"


def experiment_id(settings, study: str) -> str | None:
    name = experiment_name(settings.mlflow_experiment, study)
    found = requests.get(f"{settings.mlflow_tracking_uri}{BASE_API}/experiments/get-by-name",
                         params={"experiment_name": name}, timeout=5)
    return None if found.status_code == 404 else found.json()["experiment"]["experiment_id"]


def study_runs(settings, study: str, filter_: str = "") -> list[dict]:
    """Every active run of the study's experiment (MLflow's own REST API, paged)."""
    experiment = experiment_id(settings, study)
    if experiment is None:
        return []
    runs, request = [], {"experiment_ids": [experiment], "filter": filter_, "max_results": 1000}
    while True:
        page = requests.post(f"{settings.mlflow_tracking_uri}{BASE_API}/runs/search", json=request, timeout=10)
        page.raise_for_status()
        runs += page.json().get("runs", [])
        if not page.json().get("next_page_token"):
            return runs
        request["page_token"] = page.json()["next_page_token"]


def metric_history(settings, run_id: str, key: str) -> list[int]:
    """The steps at which `key` was logged."""
    history = requests.get(f"{settings.mlflow_tracking_uri}{BASE_API}/metrics/get-history", timeout=5,
                           params={"run_id": run_id, "metric_key": key}).json()
    return [m["step"] for m in history.get("metrics", [])]


def runs_per_trial(settings, study: str) -> Counter:
    return Counter(tags_of(r).get("trial_id") for r in study_runs(settings, study))


async def finished_runs(settings, study: str, trials: int, timeout: float = 90) -> None:
    """Wait until every trial's run is in a terminal state with its status tag."""
    seen: Counter = Counter()

    def done() -> bool:
        seen.clear()
        seen.update((r["info"]["status"], tags_of(r).get("status")) for r in study_runs(settings, study))
        return sum(n for (state, tag), n in seen.items() if state != "RUNNING" and tag not in (None, "running")) \
            >= trials
    try:
        await wait_until(done, timeout=timeout, interval=0.5, what=f"{trials} finished runs")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; runs by (state, status tag): {dict(seen)}") from None


async def divergences(env, settings, study: str) -> list:
    """What `reconcile` (tags, params, curves, final metrics, state) would repair."""
    client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
    conn = await env.db()
    try:
        outcome = await reconcile(conn, client, settings.mlflow_experiment, model_run_id=study)
    finally:
        await conn.close()
        await client.close()
    assert outcome.checked > 0
    return outcome.divergences


async def assert_reconciled(env, settings, study: str) -> None:
    found = await divergences(env, settings, study)
    assert found == [], found


async def test_slow_mlflow_gives_one_run_per_trial(env, storage, mlflow_server, monkeypatch, capfd):  # noqa: F811
    """A slow server delays the worker's run creation past start_wait_s: starts go out without a run id while the
    worker's run appears later. Each trial still ends with one run, and MLflow's console lines stay silent."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "x")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")  # the logger sets it; restored afterwards
    settings = mlflow_settings(env.settings, mlflow_server)
    settings = settings.replace(mlflow_experiment=f"{settings.mlflow_experiment}/{{study}}")
    host, port = mlflow_server.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        proxy.delay_s = 0.15  # per answer: a run creation (2-3 calls) exceeds start_wait_s below
        logger = MlflowLogger(proxy.url_for(mlflow_server), settings.mlflow_experiment)
        async with running_consumers(settings.consumer(), PIPELINE):
            await asyncio.to_thread(run_study_in_process, env, storage, "slow", WorkerPlan(4), mlflow=logger,
                                    start_wait_s=0.2)
            await finished_runs(settings, "slow", 4)
            assert logger.close(60)
            rows = await env.fetch("SELECT id, mlflow_run_id, status FROM trials WHERE model_run_id = 'slow'")
            assert len(rows) == 4
            assert any(r["mlflow_run_id"] is None for r in rows), "the slow server never delayed a start"
            await asyncio.sleep(3)  # a worker's late run would show up now
    assert runs_per_trial(settings, "slow") == Counter({r["id"]: 1 for r in rows})
    for run in study_runs(settings, "slow"):  # the worker uploaded its model to the consumer's runs too
        artifacts = await asyncio.to_thread(MlflowClient(mlflow_server).list_artifacts, run["info"]["run_id"], "model")
        assert [a.path for a in artifacts] == ["model/state_dict.pt"]
    await assert_reconciled(env, settings, "slow")
    assert "View run" not in capfd.readouterr().out


async def test_two_consumer_instances_give_one_run_per_trial(env, mlflow_server):  # noqa: F811
    """Two `mlflow` consumers share the queue; half the trials carry a worker's (untagged) run id in their start,
    the other half leave the run to the consumers."""
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(24, 4, seed=21, producer=producer_info())
    name = study[0][0].model_run_id
    client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
    try:
        experiment = await client.experiment_id(experiment_name(settings.mlflow_experiment, name))
        carried = {}
        for trial in study[::2]:
            start = trial[0]
            carried[start.trial_id] = await client.create_run(experiment, "worker-run", 0)
            trial[0] = start.model_copy(update={"payload": start.payload.model_copy(
                update={"mlflow_run_id": carried[start.trial_id]})})
    finally:
        await client.close()
    config = settings.consumer()
    async with running_consumers(config, ["journal", "trials", "mlflow"]), running_consumers(config, ["mlflow"]):
        await publish(env, [e for trial in study for e in trial])
        await finished_runs(settings, name, len(study))
        # A trial's run can be finished by one instance while the other still logs its earlier epochs: stop the
        # consumers only once MLflow has converged.
        await wait_until(lambda: _none(divergences(env, settings, name)), timeout=60, interval=0.5,
                         what="MLflow to converge")
    counts = runs_per_trial(settings, name)
    assert counts == Counter({trial[0].trial_id: 1 for trial in study})
    for run in study_runs(settings, name):
        trial_id = tags_of(run)["trial_id"]
        if trial_id in carried:
            assert run["info"]["run_id"] == carried[trial_id]
    await assert_reconciled(env, settings, name)
    assert await env.dead_letters("sntrack.mlflow") == []


async def test_consumer_relinks_when_its_run_was_deleted(env, mlflow_server):  # noqa: F811
    """The consumer's linked run is deleted behind its back (a repair between its check and the link update, a
    user): the next events go to the trial's other run, found by tag, instead of an HTTP 400 dead-lettered as
    mlflow_rejected; with no other run, the deleted one is restored."""
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(2, 3, seed=31, producer=producer_info())
    name = study[0][0].model_run_id
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [trial[0] for trial in study])
        await wait_until(lambda: len(study_runs(settings, name)) == 2, what="the consumer's runs")
        links = {r["trial_id"]: r["run_id"] for r in await env.fetch("SELECT * FROM mlflow_runs")}
        client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
        try:
            replaced, restored = study[0][0], study[1][0]
            experiment = study_runs(settings, name)[0]["info"]["experiment_id"]
            other = await client.create_run(experiment, "other", 0, {"trial_id": replaced.trial_id})
            for start in (replaced, restored):
                await client.delete_run(links[start.trial_id])
        finally:
            await client.close()
        await publish(env, [e for trial in study for e in trial[1:]])
        await finished_runs(settings, name, 2)
    assert runs_per_trial(settings, name) == Counter({replaced.trial_id: 1, restored.trial_id: 1})
    assert await env.dead_letters("sntrack.mlflow") == []
    now = {r["trial_id"]: r["run_id"] for r in await env.fetch("SELECT * FROM mlflow_runs")}
    assert now == {replaced.trial_id: other, restored.trial_id: links[restored.trial_id]}


async def test_reconcile_repair_beside_the_consumer(env, mlflow_server):  # noqa: F811
    """Repairs run in a loop while the consumer syncs a study: one run per trial, nothing dead-lettered."""
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(16, 4, seed=41, producer=producer_info())
    name = study[0][0].model_run_id
    client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
    conn = await env.db()
    try:
        async with running_consumers(settings.consumer(), PIPELINE):
            publishing = asyncio.create_task(publish(env, [e for trial in study for e in trial]))
            while not publishing.done() or len(study_runs(settings, name)) < len(study):
                await reconcile(conn, client, settings.mlflow_experiment, model_run_id=name, fix=True)
                await asyncio.sleep(0.2)
            await finished_runs(settings, name, len(study))
            await reconcile(conn, client, settings.mlflow_experiment, model_run_id=name, fix=True)
    finally:
        await conn.close()
        await client.close()
    assert runs_per_trial(settings, name) == Counter({trial[0].trial_id: 1 for trial in study})
    await assert_reconciled(env, settings, name)
    assert await env.dead_letters("sntrack.mlflow") == []


async def test_runs_read_well(env, mlflow_server):  # noqa: F811
    """Experiment per study, arm in the run name, `params.spectral_norm = 'true'` finds the SN runs, singular
    values by step, and the consumer's runs carry params and the learning curve."""
    settings = mlflow_settings(env.settings, mlflow_server)
    settings = settings.replace(mlflow_experiment=settings.mlflow_experiment + "/{study}")
    study = synthetic_study(4, 3, seed=51, producer=producer_info())
    name = study[0][0].model_run_id
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [e for trial in study for e in trial])
        await finished_runs(settings, name, len(study))
    sn = {t[0].trial_id for t in study if t[0].payload.spectral_norm}
    found = study_runs(settings, name, "params.spectral_norm = 'true'")
    assert {tags_of(r)["trial_id"] for r in found} == sn and sn
    for run in study_runs(settings, name):
        trial_id = tags_of(run)["trial_id"]
        assert run["info"]["run_name"] == ("sn-" if trial_id in sn else "base-") + trial_id
        assert {p["key"] for p in run["data"]["params"]} >= {"spectral_norm", "dataset", "seed"}
        assert any(k.startswith("singular_value/") for k in metrics_of(run))
        [events] = [t for t in study if t[0].trial_id == trial_id]
        epochs = [e.payload.epoch for e in events if e.event_type == "ml.run.metric"]
        assert sorted(metric_history(settings, run["info"]["run_id"], "val_loss")) == epochs and epochs
    await assert_reconciled(env, settings, name)


async def test_reconcile_reports_a_changed_curve_point(env, mlflow_server):  # noqa: F811
    """A curve point MLflow holds with another value than the event's, and a removed tag, are reported (a metric
    history cannot be rewritten, so a wrong point stays reported after a repair)."""
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(2, 3, seed=61, producer=producer_info())
    name = study[0][0].model_run_id
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [e for trial in study for e in trial])
        await finished_runs(settings, name, 2)
    [run] = study_runs(settings, name, f"tags.trial_id = '{study[0][0].trial_id}'")
    mlflow_post(settings, "runs/delete-tag", {"run_id": run["info"]["run_id"], "key": "model_run_id"})
    client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
    conn = await env.db()
    try:
        epoch = study[0][1]  # the same key and step with another value, logged later
        await client.log_batch(run["info"]["run_id"], metrics=[("val_loss", 123.0, 10**13, epoch.payload.epoch)])
        outcome = await reconcile(conn, client, settings.mlflow_experiment, model_run_id=name)
        assert {(d.trial_id, d.kind) for d in outcome.divergences} == {(epoch.trial_id, "curve"),
                                                                        (epoch.trial_id, "tag")}
    finally:
        await conn.close()
        await client.close()


async def test_repair_gives_a_trial_mlflow_missed_its_params_and_curve(env, mlflow_server):  # noqa: F811
    """Events acked while MLflow sync was disabled: reconcile reports the missing runs, --repair creates them with
    tags, params, the learning curve, final metrics and state, and a second check is clean."""
    settings = mlflow_settings(env.settings, mlflow_server)
    study = synthetic_study(3, 3, seed=63, producer=producer_info())
    name = study[0][0].model_run_id
    async with running_consumers(settings.replace(mlflow_enabled=False).consumer(), PIPELINE):
        await publish(env, [e for trial in study for e in trial])
        await wait_until(lambda: env.fetchval("SELECT count(*) = 3 FROM trials WHERE status <> 'running'"),
                         what="the trials")
        await wait_until(lambda: env.queue_depth("sntrack.mlflow") == 0, what="the mlflow queue drained")
    client = MlflowRest(settings.mlflow_tracking_uri, 10.0)
    conn = await env.db()
    try:
        outcome = await reconcile(conn, client, settings.mlflow_experiment, model_run_id=name, fix=True)
        assert {d.kind for d in outcome.divergences} == {"missing_run"} and len(outcome.divergences) == 3
        assert outcome.unrepaired == []
    finally:
        await conn.close()
        await client.close()
    await assert_reconciled(env, settings, name)
    for run in study_runs(settings, name):
        assert any(k.startswith("singular_value/") for k in metrics_of(run)) and run["data"]["params"]


def sntrack_cli(env, *args: str, **variables: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, **env.settings.to_env(), **variables}
    return subprocess.run([sys.executable, "-m", "sntrack", *args], env=environ, capture_output=True, text=True,
                          timeout=60)


async def test_consumer_refuses_a_tracking_uri_without_scheme(env):
    done = await asyncio.to_thread(sntrack_cli, env, "consume", "mlflow", SNTRACK_MLFLOW_ENABLED="true",
                                   SNTRACK_MLFLOW_TRACKING_URI="127.0.0.1:5000")
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "SNTRACK_MLFLOW_TRACKING_URI" in lines[0] and "Traceback" not in done.stderr


async def test_reconcile_names_close_matches_and_says_when_nothing_was_checked(env, mlflow_server):  # noqa: F811
    settings = mlflow_settings(env.settings, mlflow_server)
    variables = {"SNTRACK_MLFLOW_ENABLED": "true", "SNTRACK_MLFLOW_TRACKING_URI": mlflow_server,
                 "SNTRACK_MLFLOW_EXPERIMENT": settings.mlflow_experiment}
    empty = await asyncio.to_thread(sntrack_cli, env, "reconcile", **variables)
    assert empty.returncode == 0 and "nothing to check" in empty.stdout, empty.stdout + empty.stderr
    study = synthetic_study(1, 2, seed=71, producer=producer_info(), model_run_id="wine-sn-study")
    async with running_consumers(settings.consumer(), ["journal", "trials"]):
        await publish(env, study[0])
        await wait_until(lambda: env.fetchval("SELECT count(*) = 1 FROM trials"), what="the trial")
    typo = await asyncio.to_thread(sntrack_cli, env, "reconcile", "--run", "wine-sn-stduy", **variables)
    assert typo.returncode == 2 and "wine-sn-study" in typo.stderr, typo.stdout + typo.stderr


async def _none(found) -> bool:
    return not await found
