"""What MLflow must show for a trial — one definition shared by the sync consumer and `sntrack reconcile`."""

from __future__ import annotations

RUN_STATUS = {"running": "RUNNING", "completed": "FINISHED", "failed": "FAILED", "pruned": "KILLED"}
TERMINAL = frozenset({"completed", "failed", "pruned"})
SYNCED_TAGS = ("trial_id", "model_run_id", "spectral_norm", "constraint_method", "status")


def trial_tags(trial_id: str, model_run_id: str, spectral_norm: bool, status: str | None) -> dict[str, str]:
    """The sntrack tags of a trial's run; `status` None leaves the status tag out (never overwrite a terminal one)."""
    tags = {
        "trial_id": trial_id,
        "model_run_id": model_run_id,
        "spectral_norm": str(spectral_norm).lower(),
        "constraint_method": "spectral_norm" if spectral_norm else "none",
    }
    if status is not None:
        tags["status"] = status
    return tags


def advisory_key(trial_id: str) -> str:
    """Text hashed by PostgreSQL (hashtextextended) into the advisory lock serialising run creation per trial."""
    return f"sntrack.mlflow:{trial_id}"
