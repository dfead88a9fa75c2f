"""What MLflow must show for a trial — one definition shared by the sync consumer and `sntrack reconcile`.

The names themselves (tags, params, metric keys, run name, experiment) are the contract's: `schemas.mlflow`.
"""

from __future__ import annotations

RUN_STATUS = {"running": "RUNNING", "completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}
TERMINAL = frozenset({"completed", "failed", "pruned"})


def advisory_key(trial_id: str) -> str:
    """Text hashed by PostgreSQL (hashtextextended) into the advisory lock serialising run creation per trial."""
    return f"sntrack.mlflow:{trial_id}"
