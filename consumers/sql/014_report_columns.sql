-- What `sntrack report` reads of each trial, kept ready: the final measurements as numbers and the hyper-parameters
-- and σ as JSON text. Extracting them from jsonb on every read took the server about 0.2 s over 100,000 trials,
-- longer than the command's own work while it read; stored, a trial pays for them once per write (its start and
-- stop). Generated: they are what the expressions give, whoever writes the row (live, replay, migration).
ALTER TABLE trials
    ADD COLUMN final_val_accuracy double precision
        GENERATED ALWAYS AS ((metrics ->> 'final_val_accuracy')::double precision) STORED,
    ADD COLUMN final_train_accuracy double precision
        GENERATED ALWAYS AS ((metrics ->> 'final_train_accuracy')::double precision) STORED,
    ADD COLUMN final_duration_ms double precision
        GENERATED ALWAYS AS ((metrics ->> 'duration_ms')::double precision) STORED,
    ADD COLUMN hyperparams_text text GENERATED ALWAYS AS (hyperparams::text) STORED,
    ADD COLUMN last_sigmas_text text GENERATED ALWAYS AS (last_sigmas::text) STORED;
