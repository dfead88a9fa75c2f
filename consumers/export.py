"""The read model as flat rows: one per trial, or one per trial and epoch (for `sntrack export`)."""

from __future__ import annotations

import json

import asyncpg

TRIAL_COLUMNS = ("model_run_id", "trial_id", "spectral_norm", "status", "paired_with", "dataset", "model", "seed",
                 "optuna_trial_number", "epochs", "duration_ms", "error_type", "error_message", "started_at",
                 "finished_at")

KEPT_PER_EPOCH = ("model_run_id", "trial_id", "spectral_norm", "status", "paired_with", "dataset", "seed")

SELECT_TRIALS = """
SELECT t.model_run_id, t.id AS trial_id, t.spectral_norm, t.status, t.paired_with, t.dataset, t.model, t.seed,
       t.optuna_trial_number, t.epochs, t.duration_ms, t.error_type, t.error_message, t.started_at, t.finished_at,
       t.hyperparams::text AS hyperparams, t.metrics::text AS metrics
FROM trials t WHERE t.model_run_id = $1 ORDER BY t.optuna_trial_number NULLS LAST, t.id
"""

SELECT_CURVES = """
SELECT m.trial_id, m.epoch, m.measurements::text AS measurements
FROM trial_metrics m JOIN trials t ON t.id = m.trial_id WHERE t.model_run_id = $1 ORDER BY m.trial_id, m.epoch
"""


async def trial_rows(conn: asyncpg.Connection, study: str) -> list[dict]:
    """One row per trial: its fields, `hp.<name>` per hyper-parameter and `final.<name>` per final measurement
    (tests/test_export.py)."""
    rows = []
    for r in await conn.fetch(SELECT_TRIALS, study):
        row = {c: r[c] for c in TRIAL_COLUMNS}
        row.update({f"hp.{k}": v for k, v in json.loads(r["hyperparams"]).items()})
        row.update({f"final.{k}": v for k, v in json.loads(r["metrics"]).items()})
        rows.append(row)
    return rows


async def curve_rows(conn: asyncpg.Connection, study: str) -> list[dict]:
    """One row per trial and epoch: the trial's identifying fields and hyper-parameters, then the epoch's
    measurements."""
    trials = {row["trial_id"]: row for row in await trial_rows(conn, study)}
    out = []
    for r in await conn.fetch(SELECT_CURVES, study):
        trial = trials[r["trial_id"]]
        row = {k: v for k, v in trial.items() if k in KEPT_PER_EPOCH or k.startswith("hp.")}
        row["epoch"] = r["epoch"]
        row.update(json.loads(r["measurements"]))
        out.append(row)
    return out
