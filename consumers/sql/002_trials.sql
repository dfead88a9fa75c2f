-- The Trial read model. Times are taken from the events, so a replay reproduces every row exactly.
CREATE TABLE trials (
    id                  text        PRIMARY KEY,
    model_run_id        text        NOT NULL,
    spectral_norm       boolean     NOT NULL DEFAULT false,
    status              text        NOT NULL DEFAULT 'running'
                        CHECK (status IN ('running', 'completed', 'failed', 'pruned')),
    mlflow_run_id       text,
    hyperparams         jsonb       NOT NULL DEFAULT '{}',
    metrics             jsonb       NOT NULL DEFAULT '{}',  -- the stop event's final measurements
    dataset             text,
    model               text,
    seed                bigint,
    optuna_trial_number integer,
    paired_with         text,
    epochs              integer,
    duration_ms         double precision,
    error_type          text,
    error_message       text,
    last_seq            integer     NOT NULL DEFAULT 0,  -- the stop's seq once stopped
    started_at          timestamptz,
    finished_at         timestamptz,
    inserted_at         timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX trials_model_run ON trials (model_run_id);
CREATE INDEX trials_flag_status ON trials (spectral_norm, status);
CREATE INDEX trials_recent ON trials (inserted_at DESC);

CREATE TABLE trial_metrics (
    trial_id       text        NOT NULL,
    epoch          integer     NOT NULL,
    seq            integer     NOT NULL,
    train_loss     double precision,
    val_loss       double precision,
    train_accuracy double precision,
    val_accuracy   double precision,
    measurements   jsonb       NOT NULL,
    spectral_norms jsonb,
    occurred_at    timestamptz NOT NULL,
    PRIMARY KEY (trial_id, epoch)
);
