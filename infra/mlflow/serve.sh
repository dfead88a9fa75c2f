#!/usr/bin/env bash
# Start a local MLflow tracking server for sntrack (one uvicorn worker, no job runner, PostgreSQL backend
# `sntrack_mlflow` created when missing, artifacts served from a local folder) and wait until /health answers.
# Idempotent: does nothing when a healthy server already answers on the port.
#   infra/mlflow/serve.sh [--port 5000] [--backend postgres|sqlite] [--dir DIR]
#   infra/mlflow/serve.sh stop|status [--port 5000]   (the same as: sntrack mlflow-server start|stop|status)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
sntrack="${SNTRACK_BIN:-$root/.venv/bin/sntrack}"
action=start
case "${1:-}" in start|stop|status) action="$1"; shift ;; esac
exec "$sntrack" mlflow-server "$action" "$@"
