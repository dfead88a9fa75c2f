"""`studies delete --hard` removes the study's MLflow runs too, and late events never bring them back, against a
real MLflow server."""

from __future__ import annotations

import os
import subprocess
import sys

from consumers.service import running_consumers
from producer.emitter import producer_info
from producer.sample import synthetic_study
from tests.conftest import wait_until
from tests.mlflow_server import mlflow_server, mlflow_settings  # noqa: F401
from tests.test_mlflow import search_runs, synced


async def test_hard_delete_removes_the_studys_mlflow_runs(env, mlflow_server):  # noqa: F811
    settings = mlflow_settings(env.settings, mlflow_server)
    trials = synthetic_study(3, 2, producer=producer_info(), model_run_id="gone", seed=5)
    async with running_consumers(settings.consumer(), ["journal", "trials", "mlflow"]):
        await env.publish_events([e for t in trials for e in t])
        for trial in trials:
            await wait_until(lambda t=trial: synced(settings, t), timeout=120, what=f"{trial[0].trial_id} in MLflow")

    environ = {**os.environ, **settings.to_env(), "SNTRACK_OPTUNA_STORAGE": env.settings.database_url + "_none"}
    run = subprocess.run([sys.executable, "-m", "sntrack", "studies", "delete", "gone", "--hard"],
                         env=environ, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "; 3 MLflow runs deleted" in run.stdout, run.stdout
    for trial in trials:
        assert search_runs(settings, trial[0].trial_id) == []  # active runs only: all deleted

    # The same events arrive again, late, followed by a trial of another study: once that one is in MLflow, the
    # mlflow consumer has handled the late events before it, and must have recreated no run.
    sentinel = synthetic_study(1, 2, producer=producer_info(), model_run_id="alive", seed=6)[0]
    async with running_consumers(settings.consumer(), ["mlflow"]):
        await env.publish_events([e for t in trials for e in t])
        await env.publish_events(sentinel)
        await wait_until(lambda: synced(settings, sentinel), timeout=120, what="the trial after the late events")
    for trial in trials:
        assert search_runs(settings, trial[0].trial_id) == []
    assert env.queue_depth("sntrack.mlflow.dlq") == 0
