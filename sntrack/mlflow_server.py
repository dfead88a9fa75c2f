"""A local MLflow tracking server for the demo and the tests: one process, started once, healthy before use.

`mlflow server` (3.x) starts 4 uvicorn workers, a job runner and several huey consumers by default (~250 MB
each, and a minute to start on 2 cores). Here: `--workers 1` and MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false, one
uvicorn process. One worker also avoids a 40 ms stall per request: uvicorn binds the socket itself when it has
several workers, and that socket (created without IPPROTO_TCP) never gets TCP_NODELAY, so every keep-alive
response waits for the client's delayed ACK (docs/mlflow.md).

    sntrack mlflow-server start [--port 5000] [--backend postgres|sqlite] [--dir DIR]
    sntrack mlflow-server stop|status [--port 5000] [--dir DIR]

`start` does nothing when a healthy server already answers on the port. The PostgreSQL backend uses the
database `sntrack_mlflow` on the server of SNTRACK_DATABASE_URL, created when missing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigurationError
from common.postgres import create_database
from common.urls import scrub, with_path

DEFAULT_PORT = 5000
BACKEND_DATABASE = "sntrack_mlflow"
START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port nothing listens on right now, for a server of our own."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def postgres_backend(database_url: str) -> str:
    """SQLAlchemy's URI of the `sntrack_mlflow` database beside sntrack's own, created when missing."""
    create_database(with_path(database_url, BACKEND_DATABASE))
    return with_path(database_url, BACKEND_DATABASE, scheme="postgresql+psycopg2")


@dataclass
class MlflowServer:
    url: str
    pid: int | None  # None: it was already running, not started by us
    startup_s: float = 0.0

    def stop(self, *, kill: bool = False, timeout_s: float = 30.0) -> None:
        """End the server's process group (the `mlflow` CLI and its uvicorn child); kill=True is a crash."""
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.1)
            os.killpg(self.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether any process of the group led by `pid` lives (reaping the leader when it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


# Ends a server's process group once the process that started it is gone, however it ended (kill -9 included):
# the watchdog is that process's child, so it is re-parented when its parent dies.
WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(1)
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        break
    time.sleep(5)
"""

_watchdogs: list[subprocess.Popen] = []  # kept for this process's lifetime: they outlive every server object


def pid_file(folder: Path, port: int) -> Path:
    return folder / f"server-{port}.pid"


def start(port: int, backend_uri: str, folder: Path, *, host: str = "127.0.0.1",
          timeout_s: float = START_TIMEOUT_S, die_with_parent: bool = False) -> MlflowServer:
    """Start `mlflow server` on `port` with artifacts and its log in `folder`; wait for /health.

    die_with_parent: the server ends when this process ends, even by SIGKILL (test sessions;
    tests/test_leftovers.py::test_mlflow_server_dies_with_the_process_that_started_it)."""
    url = f"http://{host}:{port}"
    if healthy(url):
        return MlflowServer(url, None)
    folder.mkdir(parents=True, exist_ok=True)
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow), "server", "--workers", "1", "--host", host, "--port", str(port),
               "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts")]
    # The backend URI holds the database password: `mlflow server` reads it from this variable (click's envvar of
    # --backend-store-uri), never from the command line, which `ps` shows to every local user
    # (tests/test_no_secret_leaks.py).
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": backend_uri}
    started = time.perf_counter()
    with open(folder / f"server-{port}.log", "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, start_new_session=True)
    if die_with_parent:
        _watchdogs.append(subprocess.Popen([sys.executable, "-c", WATCHDOG, str(os.getpid()), str(process.pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    pid_file(folder, port).write_text(str(process.pid))
    server = MlflowServer(url, process.pid)
    while not healthy(url):
        if process.poll() is not None or time.perf_counter() - started > timeout_s:
            server.stop(kill=True)
            tail = scrub((folder / f"server-{port}.log").read_text(errors="replace")[-2000:], backend_uri)
            raise ConfigurationError(f"MLflow server on port {port} did not become healthy:\n{tail}")
        time.sleep(0.2)
    server.startup_s = time.perf_counter() - started
    return server
