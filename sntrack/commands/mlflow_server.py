"""sntrack mlflow-server start|stop|status — a local MLflow tracking server for the demo (sntrack/mlflow_server.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sntrack.mlflow_server import (
    BACKEND_DATABASE,
    DEFAULT_PORT,
    MlflowServer,
    healthy,
    pid_file,
    postgres_backend,
    start,
)
from sntrack.settings import Settings, _default_state_dir


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("mlflow-server", help="a local MLflow tracking server (demo)",
                            description="Start, stop or check a local MLflow tracking server: one uvicorn worker, "
                            "healthy before `start` returns; `start` does nothing when a healthy server answers.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (("start", "start it unless a healthy one answers"), ("stop", "stop the one started here"),
                              ("status", "exit 0 when healthy, 1 when not answering")):
        child = actions.add_parser(action, help=help_text, description=help_text)
        child.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
        child.add_argument("--dir", type=Path, default=_default_state_dir() / "mlflow",
                           help="artifacts, log, pid file and SQLite database (default: %(default)s)")
        if action == "start":
            child.add_argument("--backend", choices=("postgres", "sqlite"), default="postgres",
                               help=f"backend store: database {BACKEND_DATABASE} on the server of "
                               "SNTRACK_DATABASE_URL, created when missing (default), or a SQLite file")
        child.set_defaults(run=globals()[f"_{action}"])


def _status(args: argparse.Namespace, settings: Settings) -> int:
    url = f"http://127.0.0.1:{args.port}"
    ok = healthy(url)
    print(f"MLflow at {url}: {'healthy' if ok else 'not answering'}")
    return 0 if ok else 1


def _stop(args: argparse.Namespace, settings: Settings) -> int:
    url = f"http://127.0.0.1:{args.port}"
    path = pid_file(args.dir, args.port)
    MlflowServer(url, int(path.read_text()) if path.exists() else None).stop()
    path.unlink(missing_ok=True)
    print(f"MLflow at {url} stopped")
    return 0


def _start(args: argparse.Namespace, settings: Settings) -> int:
    url = f"http://127.0.0.1:{args.port}"
    backend = (postgres_backend(settings.database_url) if args.backend == "postgres"
               else f"sqlite:///{(args.dir / 'mlflow.db').resolve()}")
    args.dir.mkdir(parents=True, exist_ok=True)
    server = start(args.port, backend, args.dir)
    if server.pid is None:
        print(f"MLflow at {url} is already healthy")
    else:
        print(f"MLflow at {url} healthy after {server.startup_s:.1f}s (pid {server.pid}, log {args.dir})")
    return 0
