-- A stopped trial's summary, kept by the trials projection so that `sntrack report` reads no curve: the epochs it
-- took to reach 95% of its final validation accuracy (from 1), and the per-layer σ at its last measured epoch.
ALTER TABLE trials ADD COLUMN epochs_to_95 bigint, ADD COLUMN last_sigmas jsonb;

UPDATE trials t SET epochs_to_95 = s.epochs_to_95, last_sigmas = s.last_sigmas
FROM (SELECT m.trial_id, (min(m.epoch) FILTER (
                 WHERE m.val_accuracy >= 0.95 * (x.metrics ->> 'final_val_accuracy')::double precision))::bigint + 1
                 AS epochs_to_95,
             (array_agg(m.spectral_norms ORDER BY m.epoch DESC))[1] AS last_sigmas
      FROM trial_metrics m JOIN trials x ON x.id = m.trial_id WHERE x.finished_at IS NOT NULL
      GROUP BY m.trial_id) s
WHERE t.id = s.trial_id;
