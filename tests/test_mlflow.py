"""The mlflow consumer and `sntrack reconcile` against a real MLflow server, broker and database (issue 5)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import requests

from consumers.mlflow.client import MlflowRest
from consumers.mlflow.expected import RUN_STATUS
from consumers.mlflow.reconcile import reconcile
from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.mlflow_server import mlflow_server, mlflow_settings, own_mlflow_server  # noqa: F401

PIPELINE = ["journal", "trials", "mlflow"]


def search_runs(settings, trial_id: str) -> list[dict]:
    """MLflow's own REST API: the active runs carrying tags.trial_id in the test's experiment."""
    base = f"{settings.mlflow_tracking_uri}/api/2.0/mlflow"
    found = requests.get(f"{base}/experiments/get-by-name", params={"experiment_name": settings.mlflow_experiment},
                         timeout=5)
    if found.status_code == 404:
        return []
    found.raise_for_status()
    response = requests.post(f"{base}/runs/search", timeout=5, json={
        "experiment_ids": [found.json()["experiment"]["experiment_id"]], "filter": f"tags.trial_id = '{trial_id}'"})
    response.raise_for_status()
    return response.json().get("runs", [])


def mlflow_post(settings, path: str, body: dict) -> None:
    requests.post(f"{settings.mlflow_tracking_uri}/api/2.0/mlflow/{path}", json=body, timeout=5).raise_for_status()


def tags_of(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


async def publish(env, events) -> None:
    for event in events:
        await env.publish_raw([event.to_json()], routing_key=event.event_type)


def synced(settings, trial) -> bool:
    """One run for the trial, in its final state with its status tag."""
    stop = trial[-1]
    runs = search_runs(settings, stop.trial_id)
    return (len(runs) == 1 and runs[0]["info"]["status"] == RUN_STATUS[stop.payload.status]
            and tags_of(runs[0]).get("status") == stop.payload.status)


async def wait_synced(settings, study, timeout: float = 30.0) -> None:
    await wait_until(lambda: all(synced(settings, t) for t in study), timeout=timeout, interval=0.2,
                     what="every trial's run in MLflow")


async def synced_study(env, url: str, trials: int, epochs: int, seed: int):
    """A synthetic study through journal, trials and mlflow, until every run is in MLflow."""
    settings = mlflow_settings(env.settings, url)
    study = synthetic_study(trials, epochs, seed=seed, producer=producer_info())
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [e for trial in study for e in trial])
        await wait_synced(settings, study)
    return settings, study


async def test_study_runs_carry_tags_and_final_metrics(env, mlflow_server):  # noqa: F811
    settings, study = await synced_study(env, mlflow_server, 6, 3, seed=5)
    links = {r["trial_id"]: r["mlflow_run_id"] for r in await env.fetch("SELECT * FROM trial_mlflow_runs")}
    for trial in study:
        start, stop = trial[0], trial[-1]
        [run] = search_runs(settings, start.trial_id)
        flag = start.payload.spectral_norm
        assert tags_of(run).items() >= {
            "trial_id": start.trial_id, "model_run_id": start.model_run_id, "spectral_norm": str(flag).lower(),
            "constraint_method": "spectral_norm" if flag else "none", "status": stop.payload.status,
        }.items()
        assert metrics_of(run).items() >= stop.payload.measurements.items()
        assert run["info"]["end_time"] == int(stop.occurred_at.timestamp() * 1000)
        assert links[start.trial_id] == run["info"]["run_id"]  # the read model shows the run


async def test_start_delivered_three_times_creates_one_run(env, mlflow_server):  # noqa: F811
    settings = mlflow_settings(env.settings, mlflow_server)
    [trial] = synthetic_study(1, 2, seed=7, producer=producer_info())
    start = trial[0]
    assert start.payload.mlflow_run_id is None
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [start, start])
        await wait_until(lambda: len(search_runs(settings, start.trial_id)) == 1, what="the run")
        await publish(env, [start, *trial[1:]])  # a third delivery, in a later batch, then the rest
        await wait_synced(settings, [trial])
    assert len(search_runs(settings, start.trial_id)) == 1
    assert await env.fetchval("SELECT origin FROM mlflow_runs WHERE trial_id = $1", start.trial_id) == "created"


async def test_mlflow_killed_and_restarted_mid_stream(env, own_mlflow_server):  # noqa: F811
    server = own_mlflow_server
    settings = mlflow_settings(env.settings, server.url)
    study = synthetic_study(8, 3, seed=11, producer=producer_info())
    first, second = study[:4], study[4:]
    async with running_consumers(settings.consumer(), PIPELINE):
        await publish(env, [e for trial in first for e in trial])
        await wait_synced(settings, first)
        server.kill()
        await publish(env, [e for trial in second for e in trial])
        # journal and trials keep up while MLflow is down
        total = sum(len(t) for t in study)
        await wait_until(lambda: env.fetchval("SELECT count(*) = $1 FROM events", total), timeout=15,
                         what="journal while MLflow is down")
        await wait_until(lambda: env.fetchval("SELECT count(*) = 8 FROM trials WHERE status <> 'running'"),
                         timeout=15, what="trials while MLflow is down")
        await asyncio.sleep(2)  # the mlflow consumer keeps its batch unacked, retrying against the dead server
        await asyncio.to_thread(server.start)
        await wait_synced(settings, study, timeout=60)
    assert await env.fetchval("SELECT count(*) FROM mlflow_runs") == 8
    assert await env.dead_letters("sntrack.mlflow") == []


async def test_reconcile_finds_and_repairs_a_changed_tag_and_a_deleted_run(env, mlflow_server):  # noqa: F811
    settings, study = await synced_study(env, mlflow_server, 3, 2, seed=13)
    changed, deleted = study[0][0].trial_id, study[1][0].trial_id
    [run] = search_runs(settings, changed)
    mlflow_post(settings, "runs/set-tag", {"run_id": run["info"]["run_id"], "key": "spectral_norm",
                                           "value": "false" if tags_of(run)["spectral_norm"] == "true" else "true"})
    [run] = search_runs(settings, deleted)
    mlflow_post(settings, "runs/delete", {"run_id": run["info"]["run_id"]})

    cli = _reconcile_cli(settings, "--run", study[0][0].model_run_id)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "spectral_norm: expected" in cli.stdout and "deleted_run" in cli.stdout
    assert "2 divergences in 2 of 3 trials" in cli.stdout

    client = MlflowRest(settings.mlflow_tracking_uri, 5.0)
    conn = await env.db()
    try:
        repaired = await reconcile(conn, client, settings.mlflow_experiment, fix=True)
        assert {(d.trial_id, d.kind) for d in repaired.repaired} == {(changed, "tag"), (deleted, "deleted_run")}
        assert repaired.unrepaired == []
        assert (await reconcile(conn, client, settings.mlflow_experiment)).divergences == []
    finally:
        await conn.close()
        await client.close()
    assert all(synced(settings, t) for t in study)


def _reconcile_cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SNTRACK_DATABASE_URL": settings.database_url,
           "SNTRACK_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
           "SNTRACK_MLFLOW_EXPERIMENT": settings.mlflow_experiment, "SNTRACK_MLFLOW_ENABLED": "true"}
    return subprocess.run([sys.executable, "-m", "sntrack", "reconcile", *args], env=env, capture_output=True,
                          text=True, timeout=60)
