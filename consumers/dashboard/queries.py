"""The dashboard's reads of the read model (trials, trial_metrics, the MLflow mapping)."""

from __future__ import annotations

# One row per trial with its latest epoch, archived studies left out; $1 = trial ids to read, or NULL for the
# newest `$2`.
TRIALS = """
SELECT t.id, t.model_run_id, t.spectral_norm, t.status, t.dataset, t.model, t.hyperparams::text AS hyperparams,
       t.paired_with, t.epochs, t.duration_ms, (t.metrics->>'final_val_accuracy')::float8 AS final_val_accuracy,
       t.error_type, t.started_at, t.finished_at,
       COALESCE(m.run_id, t.mlflow_run_id) AS mlflow_run_id, m.experiment_id AS mlflow_experiment_id,
       l.epoch AS last_epoch, l.val_accuracy AS last_val_accuracy, l.train_loss AS last_train_loss,
       l.val_loss AS last_val_loss, l.train_accuracy AS last_train_accuracy,
       l.spectral_norms::text AS last_spectral_norms
FROM trials t
LEFT JOIN mlflow_runs m ON m.trial_id = t.id
LEFT JOIN LATERAL (SELECT * FROM trial_metrics tm WHERE tm.trial_id = t.id ORDER BY tm.epoch DESC LIMIT 1) l ON true
WHERE ($1::text[] IS NULL OR t.id = ANY($1::text[]))
  AND t.model_run_id NOT IN (SELECT model_run_id FROM archived_studies)  -- `sntrack studies delete` hides a study
ORDER BY t.inserted_at DESC, t.id
LIMIT $2
"""

# A trial's learning curve and per-layer spectral norms, epoch by epoch.
CURVE = """
SELECT epoch, train_loss, val_loss, train_accuracy, val_accuracy, spectral_norms::text AS spectral_norms
FROM trial_metrics WHERE trial_id = $1 ORDER BY epoch
"""

TRIAL_EXISTS = "SELECT spectral_norm FROM trials WHERE id = $1"
