-- The spectral-norm comparison aggregates, maintained by the `comparison` projection from stop events only.
--
-- One row per (search, flag, outcome). model_run_id = '*' is the row over all searches together (a search must
-- not be named '*'). For each row: how many trials ended with that status, and the sufficient statistics
-- (n, sum, sum of squares, min, max) of the final validation accuracy, of the train-val accuracy gap
-- (final_train_accuracy - final_val_accuracy) and of the training duration in ms, over the stops that carried
-- the measurement. Sums are `numeric` (exact decimal arithmetic on the values as the events carry them), so the
-- rows are identical whatever the order the stops arrive in, live or by replay; min/max go through LEAST/GREATEST.
-- mean = sum / n; sample variance = (sum_sq - sum^2 / n) / (n - 1).
CREATE TABLE sn_comparison (
    model_run_id  text    NOT NULL,
    spectral_norm boolean NOT NULL,
    status        text    NOT NULL CHECK (status IN ('completed', 'failed', 'pruned')),
    trials        bigint  NOT NULL,
    val_n         bigint  NOT NULL,
    val_sum       numeric NOT NULL,
    val_sum_sq    numeric NOT NULL,
    val_min       numeric,
    val_max       numeric,
    gap_n         bigint  NOT NULL,
    gap_sum       numeric NOT NULL,
    gap_sum_sq    numeric NOT NULL,
    gap_min       numeric,
    gap_max       numeric,
    duration_n      bigint  NOT NULL,
    duration_sum    numeric NOT NULL,
    duration_sum_sq numeric NOT NULL,
    duration_min    numeric,
    duration_max    numeric,
    PRIMARY KEY (model_run_id, spectral_norm, status)
);

-- Dashboard: trials by flag and status, newest first (serves the filter, the order and the LIMIT together).
CREATE INDEX trials_flag_status_recent ON trials (spectral_norm, status, inserted_at DESC);
