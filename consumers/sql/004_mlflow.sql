-- The mlflow consumer's record of which MLflow run holds each trial (issue 5).
-- The id comes from MLflow (found by the trial_id tag, created, or taken from the start event), not from the journal,
-- so it lives here and not in `trials`: `trials` stays a pure function of the journal (replay is exact), and this
-- table is written by the consumer in the same transaction as its applied_events bookkeeping.
CREATE TABLE mlflow_runs (
    trial_id      text        PRIMARY KEY,
    run_id        text        NOT NULL,
    experiment_id text        NOT NULL,
    origin        text        NOT NULL CHECK (origin IN ('event', 'found', 'created', 'repaired')),
    status        text        NOT NULL DEFAULT 'running'
                  CHECK (status IN ('running', 'completed', 'failed', 'pruned')),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX mlflow_runs_run ON mlflow_runs (run_id);

-- Every trial with the MLflow run that holds it: the consumer's verified mapping first, else the id the start
-- event carried (the worker created the run), else NULL (not synced yet).
CREATE VIEW trial_mlflow_runs AS
SELECT t.id AS trial_id,
       t.model_run_id,
       COALESCE(m.run_id, t.mlflow_run_id) AS mlflow_run_id,
       CASE WHEN m.run_id IS NOT NULL THEN m.origin WHEN t.mlflow_run_id IS NOT NULL THEN 'event' END AS origin
FROM trials t
LEFT JOIN mlflow_runs m ON m.trial_id = t.id;
