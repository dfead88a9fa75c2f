-- The best completed trial of each study (model_run_id) and arm (spectral_norm), by final validation accuracy.
-- A plugin's tables start with its name (best_trials), so they cannot collide with sntrack's or another plugin's.
CREATE TABLE best_trials_by_arm (
    model_run_id   text             NOT NULL,
    spectral_norm  boolean          NOT NULL,
    trial_id       text             NOT NULL,
    val_accuracy   double precision NOT NULL,
    finished_at    timestamptz      NOT NULL,
    PRIMARY KEY (model_run_id, spectral_norm)
);
