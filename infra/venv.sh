#!/usr/bin/env bash
# Create .venv and install sntrack (editable, with the worker and dev extras) at the exact versions of
# infra/constraints.txt, when pyproject.toml or the constraints changed since last time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[venv] creating .venv with $($PYTHON --version)" >&2
  $PYTHON -m venv .venv
fi
stamp=.venv/.sntrack-installed
want=$(cat pyproject.toml infra/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[venv] installing sntrack and the versions pinned in infra/constraints.txt (torch is the CPU build)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/python -m pip install -q -c infra/constraints.txt -e '.[worker,dev]'
  echo "$want" > "$stamp"
fi
