"""The Trial read model: `trials` (one row per trial) and `trial_metrics` (its learning curve).

Every clause is an order-independent upsert: start fills the configuration, stop the outcome, metrics the
curve; timestamps come from the events (not the clock) so a replay reproduces the live rows exactly.
Metric events touch only `trial_metrics`: updating the trial's row once per epoch made every epoch rewrite
the same hot row, which halved replay speed (progress of a running trial is max(epoch) in trial_metrics).
"""

from __future__ import annotations

from consumers.projections.base import Projection, Statement, jsonb
from consumers.topology import QueueSpec
from schemas import Event, RunMetric, RunStarted, RunStopped

_KEEP_TIMES = """
    inserted_at = LEAST(t.inserted_at, EXCLUDED.inserted_at),
    updated_at = GREATEST(t.updated_at, EXCLUDED.updated_at),
    last_seq = GREATEST(t.last_seq, EXCLUDED.last_seq)
"""

UPSERT_START = f"""
INSERT INTO trials AS t (id, model_run_id, spectral_norm, mlflow_run_id, hyperparams, dataset, model, seed,
                         optuna_trial_number, paired_with, epochs, started_at, last_seq, inserted_at, updated_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $11, $12, 0, $12, $12)
ON CONFLICT (id) DO UPDATE SET
    model_run_id = EXCLUDED.model_run_id,
    spectral_norm = EXCLUDED.spectral_norm,
    mlflow_run_id = COALESCE(EXCLUDED.mlflow_run_id, t.mlflow_run_id),
    hyperparams = EXCLUDED.hyperparams,
    dataset = EXCLUDED.dataset,
    model = EXCLUDED.model,
    seed = EXCLUDED.seed,
    optuna_trial_number = EXCLUDED.optuna_trial_number,
    paired_with = EXCLUDED.paired_with,
    epochs = EXCLUDED.epochs,
    started_at = EXCLUDED.started_at,
{_KEEP_TIMES}
"""

UPSERT_CURVE = """
INSERT INTO trial_metrics AS m (trial_id, epoch, seq, train_loss, val_loss, train_accuracy, val_accuracy,
                                measurements, spectral_norms, occurred_at, step)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)
ON CONFLICT (trial_id, epoch) DO UPDATE SET
    seq = EXCLUDED.seq, train_loss = EXCLUDED.train_loss, val_loss = EXCLUDED.val_loss,
    train_accuracy = EXCLUDED.train_accuracy, val_accuracy = EXCLUDED.val_accuracy,
    measurements = EXCLUDED.measurements, spectral_norms = EXCLUDED.spectral_norms,
    occurred_at = EXCLUDED.occurred_at, step = EXCLUDED.step
WHERE m.seq < EXCLUDED.seq
"""

# A trial can have two stops: its worker made its stop durable and was killed before telling Optuna, and another
# worker then reported it lost (worker_lost, a higher seq). The stop with the highest seq wins whatever the order.
_STOP_WINS = "(t.finished_at IS NULL OR EXCLUDED.last_seq >= t.last_seq)"
_STOP_COLUMNS = ",\n".join(
    f"    {column} = CASE WHEN {_STOP_WINS} THEN EXCLUDED.{column} ELSE t.{column} END"
    for column in ("spectral_norm", "status", "metrics", "duration_ms", "error_type", "error_message", "finished_at")
)

UPSERT_STOP = f"""
INSERT INTO trials AS t (id, model_run_id, spectral_norm, status, metrics, duration_ms, error_type, error_message,
                         finished_at, last_seq, inserted_at, updated_at)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $9, $9)
ON CONFLICT (id) DO UPDATE SET
{_STOP_COLUMNS},
{_KEEP_TIMES}
"""


def _epochs(hyperparams: dict) -> int | None:
    value = hyperparams.get("epochs")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TrialsProjection(Projection):
    name = "trials"
    queue = QueueSpec("sntrack.trials")
    tables = ("trial_metrics", "trials")

    def project(self, event: Event):
        match event:
            case RunStarted(payload=p):
                yield Statement(UPSERT_START, (
                    event.trial_id, event.model_run_id, p.spectral_norm, p.mlflow_run_id,
                    jsonb(p.hyperparams), p.dataset, p.model, p.seed, p.optuna_trial_number,
                    p.paired_with, _epochs(p.hyperparams), event.occurred_at,
                ))
            case RunMetric(payload=p):
                m = p.flat_measurements()
                yield Statement(UPSERT_CURVE, (
                    event.trial_id, p.epoch, event.seq, m.get("train_loss"), m.get("val_loss"),
                    m.get("train_accuracy"), m.get("val_accuracy"), jsonb(m),
                    None if p.spectral_norms is None else jsonb(p.spectral_norms), event.occurred_at, p.step,
                ))
            case RunStopped(payload=p):
                yield Statement(UPSERT_STOP, (
                    event.trial_id, event.model_run_id, p.spectral_norm, p.status, jsonb(p.measurements),
                    p.measurements.get("duration_ms"), p.error.type if p.error else None,
                    p.error.message if p.error else None, event.occurred_at, event.seq,
                ))
