#!/usr/bin/env bash
# Create .venv and install sntrack (editable, with dev extras) when pyproject.toml changed since last time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($PYTHON --version)" >&2
  $PYTHON -m venv .venv
fi
stamp=.venv/.sntrack-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[venv] installing sntrack and its pinned dependencies (torch is the CPU build, pinned)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
