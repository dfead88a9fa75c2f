"""MLflow tracking servers for tests: one shared per test run, or a private one a test may kill.

`mlflow_server` starts ONE server (SQLite backend, ~10 s to healthy) the first time any test of the run asks for
it, shares it across pytest-xdist workers through a lock and a state file in the run's temporary folder, and the
last user stops it. Tests isolate themselves by experiment name (`mlflow_settings`). `own_mlflow_server` is a
private server for a test that kills and restarts it; `restart()` brings it back on the same port and database.

Use: `from tests.mlflow_server import mlflow_server  # noqa: F401` in the test module.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from sntrack.mlflow_server import MlflowServer, free_port, healthy, start
from sntrack.settings import Settings


@dataclass
class LocalMlflow:
    """A server this test process started, in its own folder, restartable on the same port and database."""

    folder: Path
    port: int
    server: MlflowServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.server = start(self.port, f"sqlite:///{self.folder / 'mlflow.db'}", self.folder, die_with_parent=True)
        return self.server

    def kill(self) -> None:
        self.server.stop(kill=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def mlflow_settings(settings: Settings, url: str) -> Settings:
    """The test's settings pointed at `url`, in an experiment of its own."""
    return settings.replace(mlflow_enabled=True, mlflow_tracking_uri=url,
                            mlflow_experiment=f"test-{uuid.uuid4().hex[:12]}", mlflow_timeout_s=5.0)


def _run_folder(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent  # under xdist: the run's folder, shared by workers


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[str]:
    folder = _run_folder(tmp_path_factory, worker_id)
    state = folder / "mlflow-server.json"
    with FileLock(str(folder / "mlflow-server.lock")):
        info = json.loads(state.read_text()) if state.exists() else None
        if info is None or not healthy(info["url"]):
            local = LocalMlflow(folder / "mlflow", free_port())
            info = {"url": local.url, "pid": local.start().pid, "users": 0}
        info["users"] += 1
        state.write_text(json.dumps(info))
    yield info["url"]
    with FileLock(str(folder / "mlflow-server.lock")):
        info = json.loads(state.read_text())
        info["users"] -= 1
        if info["users"] == 0:
            MlflowServer(info["url"], info["pid"]).stop()
            state.unlink()
        else:
            state.write_text(json.dumps(info))


@pytest.fixture
def own_mlflow_server(tmp_path: Path) -> Iterator[LocalMlflow]:
    local = LocalMlflow(tmp_path / "own-mlflow", free_port())
    local.start()
    yield local
    local.stop()
