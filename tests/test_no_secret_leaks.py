"""No password in a process's arguments, a log line, an error message or an exception text (issue 10, item 3).

One run with distinctive passwords in every URL: a broker user this test creates, PostgreSQL URLs with a password
(the local server trusts the login and ignores it), and MLflow tracking URIs with user:password. Real processes:
an MLflow server on a PostgreSQL backend (started as `sntrack mlflow-server start` does), `sntrack consume all`,
a one-trial `sntrack worker`, commands that fail to connect (a wrong broker password, PostgreSQL and MLflow away),
and the worker's MLflow client failing. The test scans their output, the MLflow server's log and `ps -eww -o args`
sampled while they run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from asyncio.subprocess import PIPE
from urllib.parse import quote, urlsplit, urlunsplit

from structlog.testing import capture_logs

from common.postgres import create_database, drop_database
from common.urls import path_name, with_path
from producer.emitter import producer_info
from producer.sample import synthetic_study
from producer.tracking import MlflowLogger
from sntrack.mlflow_server import free_port, start
from tests.conftest import wait_until
from tests.test_worker_pipeline import SPACE_FLAGS

TIMEOUT_S = 90


def with_credentials(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


async def sample_ps(snapshots: list[str]) -> None:
    """Every process's full command line (-ww: untruncated), five times a second until cancelled."""
    while True:
        ps = await asyncio.create_subprocess_exec("ps", "-eww", "-o", "args", stdout=PIPE)
        snapshots.append((await ps.communicate())[0].decode(errors="replace"))
        await asyncio.sleep(0.2)


def mlflow_failure_logged(tracking_uri: str) -> str:
    """What the worker's MLflow client logs when its server is away (in this process: the worker itself waits
    for MLflow's runs on its way out, 30 s, when MLflow was away)."""
    (trial,) = synthetic_study(1, 1, seed=3, producer=producer_info())
    logger = MlflowLogger(tracking_uri, "leak")
    with capture_logs() as logs:
        logger.begin(trial[0].trial_id, trial[0].model_run_id, trial[0].payload, lambda run_id: True)
        assert logger.close(10)
    return "\n".join(json.dumps(entry) for entry in logs)


async def run(environ: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", *args, env=environ, stdout=PIPE,
                                                stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    return proc.returncode, out.decode(errors="replace")


async def test_no_password_in_arguments_logs_or_errors(env, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # for this process's MLflow client, as the worker's
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = uuid.uuid4().hex[:8]
    secrets = {name: f"Leak{run_id}{name}" for name in ("amqp", "db", "optuna", "mlflow", "backend", "wrong")}
    user = f"sntrack-test-leak-{run_id}"
    env.api.request("PUT", f"users/{user}", {"password": secrets["amqp"], "tags": ""})
    env.api.request("PUT", f"permissions/{quote(env.vhost, safe='')}/{quote(user, safe='')}",
                    {"configure": ".*", "write": ".*", "read": ".*"})
    db_user = urlsplit(env.settings.database_url).username or "postgres"
    optuna_url = with_credentials(env.settings.database_url + "_optuna", db_user, secrets["optuna"])
    mlflow_db = with_credentials(env.settings.database_url + "_mlflow", db_user, secrets["backend"])
    server_port, dead_port = free_port(), free_port()
    dead_mlflow = f"http://mluser:{secrets['mlflow']}@127.0.0.1:{dead_port}"
    environ = {**os.environ, **env.settings.to_env(), "SNTRACK_LOG_JSON": "true",
               "SNTRACK_AMQP_URL": with_credentials(env.settings.amqp_url, user, secrets["amqp"]),
               "SNTRACK_DATABASE_URL": with_credentials(env.settings.database_url, db_user, secrets["db"]),
               "SNTRACK_OPTUNA_STORAGE": optuna_url, "SNTRACK_MLFLOW_ENABLED": "true",
               "SNTRACK_MLFLOW_EXPERIMENT": f"test-leak-{run_id}",
               # MLflow's server takes no login: it ignores the credentials, and the clients send them
               "SNTRACK_MLFLOW_TRACKING_URI": f"http://mluser:{secrets['mlflow']}@127.0.0.1:{server_port}"}
    snapshots: list[str] = []
    outputs: list[str] = []
    server = None
    sampling = asyncio.create_task(sample_ps(snapshots))
    consume = await asyncio.create_subprocess_exec(sys.executable, "-m", "sntrack", "consume", "all", env=environ,
                                                   stdout=PIPE, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(create_database, mlflow_db)
        backend = with_path(mlflow_db, path_name(mlflow_db), scheme="postgresql+psycopg2")
        starting = asyncio.to_thread(start, server_port, backend, tmp_path / "mlflow", die_with_parent=True)
        # Meanwhile, connections that fail: each error names the URL, redacted, in one line.
        away_db = with_credentials("postgresql://127.0.0.1:1/nowhere", db_user, secrets["wrong"])
        failing = [({"SNTRACK_AMQP_URL": with_credentials(env.settings.amqp_url, user, secrets["wrong"])},
                    ("consume", "journal")),
                   ({"SNTRACK_DATABASE_URL": away_db}, ("report",)),
                   ({"SNTRACK_OPTUNA_STORAGE": away_db}, ("worker", "--study", "x", "--n-trials", "1"))]
        server, *failed = await asyncio.gather(starting, *(run({**environ, **variables}, *args)
                                                           for variables, args in failing))
        worker_mlflow_failure = await asyncio.to_thread(mlflow_failure_logged, dead_mlflow)
        outputs.append(worker_mlflow_failure)
        code, out = await run(environ, "worker", "--study", "leaky", "--dataset", "wine", *SPACE_FLAGS,
                              "--n-trials", "1")
        outputs.append(out)
        assert code == 0, out[-3000:]
        await wait_until(lambda: env.fetchval("SELECT count(*) = 1 FROM trials WHERE model_run_id = 'leaky' AND "
                                              "status <> 'running' AND mlflow_run_id IS NOT NULL"),
                         timeout=60, what="the worker's trial, with its MLflow run")
        failing.append(({"SNTRACK_MLFLOW_TRACKING_URI": dead_mlflow}, ("reconcile",)))  # needs a trial to check
        failed.append(await run({**environ, "SNTRACK_MLFLOW_TRACKING_URI": dead_mlflow}, "reconcile"))
        for (_, args), (code, out) in zip(failing, failed, strict=True):
            assert code == 2 and "Traceback" not in out and "***" in out.splitlines()[-1], (args, out)
            outputs.append(out)
    finally:
        consume.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(consume.communicate(), TIMEOUT_S)
        outputs.append(out.decode(errors="replace"))
        sampling.cancel()
        if server is not None:
            await asyncio.to_thread(server.stop)
        await asyncio.to_thread(drop_database, mlflow_db)
        await asyncio.to_thread(drop_database, optuna_url)
        env.api.request("DELETE", f"users/{user}")

    logs = "\n".join(outputs) + "\n".join(path.read_text(errors="replace")
                                          for path in (tmp_path / "mlflow").glob("*.log"))
    # What this scans did run: the MLflow server and the daemons were sampled in ps, and the MLflow paths logged
    # the tracking URI (redacted).
    for running in (f"mlflow server --workers 1 --host 127.0.0.1 --port {server_port}", "sntrack consume all",
                    "sntrack worker --study leaky"):
        assert any(running in snapshot for snapshot in snapshots), running
    assert f"mluser:***@127.0.0.1:{dead_port}" in worker_mlflow_failure
    assert f"mluser:***@127.0.0.1:{server_port}" in outputs[-1]  # sntrack consume all (the mlflow consumer)
    for name, password in secrets.items():
        assert password not in logs, f"the {name} password appears in a log line or error message"
        assert not any(password in snapshot for snapshot in snapshots), f"the {name} password appears in ps"
