"""`sntrack mlflow-server start|status|stop` (what infra/mlflow/serve.sh runs) starts a healthy server and stops it."""

from __future__ import annotations

import os
import subprocess
import sys

from sntrack.mlflow_server import free_port


def sntrack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sntrack", "mlflow-server", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "SNTRACK_LOG_JSON": "true"})


def test_start_status_stop(tmp_path):
    port = str(free_port())
    folder = ["--port", port, "--dir", str(tmp_path)]
    assert sntrack("status", *folder).returncode == 1
    started = sntrack("start", "--backend", "sqlite", *folder)
    try:
        assert started.returncode == 0, started.stderr
        assert "healthy after" in started.stdout
        assert (tmp_path / f"server-{port}.pid").exists()
        assert "already healthy" in sntrack("start", "--backend", "sqlite", *folder).stdout
        status = sntrack("status", *folder)
        assert status.returncode == 0 and "healthy" in status.stdout
    finally:
        stopped = sntrack("stop", *folder)
    assert stopped.returncode == 0, stopped.stderr
    assert not (tmp_path / f"server-{port}.pid").exists()
    assert sntrack("status", *folder).returncode == 1
