-- ml.run.metric schema_version 2 (schemas/events.py) carries the optimiser step of each epoch's measurements.
-- NULL where it is unknown: every version 1 event, and producers that do not count steps.
ALTER TABLE trial_metrics ADD COLUMN step bigint;
