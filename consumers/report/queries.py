"""The SQL of the comparison: the report's reads, the dashboard's queries (docs/queries.md), and the
`sn_comparison` rows recomputed from `trials` in one statement (the projection's cross-check and the benchmark's
loader)."""

from __future__ import annotations

from consumers.projections.comparison_keys import OVERALL, STATS

# The dashboard's "average validation accuracy by spectral_norm over completed trials": at most two rows of
# sn_comparison by primary key, whatever the number of trials. $1 = a model_run_id, or '*' for all searches.
AVG_VAL_ACCURACY_BY_FLAG = """
SELECT spectral_norm, val_n AS trials, (val_sum / NULLIF(val_n, 0))::float8 AS mean_val_accuracy
FROM sn_comparison
WHERE model_run_id = $1 AND status = 'completed'
ORDER BY spectral_norm
"""

# The same figures by GROUP BY over every trial: what sn_comparison saves (the benchmark's baseline).
AVG_VAL_ACCURACY_BY_FLAG_FROM_TRIALS = """
SELECT spectral_norm, count((metrics->>'final_val_accuracy')::float8) AS trials,
       avg((metrics->>'final_val_accuracy')::float8) AS mean_val_accuracy
FROM trials
WHERE status = 'completed'
GROUP BY spectral_norm
ORDER BY spectral_norm
"""

# Trials started in the last day, newest first (index trials_recent).
RECENT_TRIALS = """
SELECT id, model_run_id, spectral_norm, status, dataset, (metrics->>'final_val_accuracy')::float8 AS final_val_accuracy,
       duration_ms, inserted_at
FROM trials
WHERE inserted_at >= now() - interval '1 day'
ORDER BY inserted_at DESC
LIMIT 20
"""

# Trials with a given flag ($1) and status ($2), newest first, $3 at most (index trials_flag_status_recent).
TRIALS_BY_FLAG_AND_STATUS = """
SELECT id, model_run_id, spectral_norm, status, dataset, (metrics->>'final_val_accuracy')::float8 AS final_val_accuracy,
       duration_ms, inserted_at
FROM trials
WHERE spectral_norm = $1 AND status = $2
ORDER BY inserted_at DESC
LIMIT $3
"""

def _aggregates(prefix: str) -> str:
    return (f"count({prefix}) AS {prefix}_n, COALESCE(sum({prefix}), 0) AS {prefix}_sum, "
            f"COALESCE(sum({prefix} * {prefix}), 0) AS {prefix}_sum_sq, "
            f"min({prefix}) AS {prefix}_min, max({prefix}) AS {prefix}_max")


# Every sn_comparison row recomputed from the finished trials (the stop's measurements are what `trials.metrics`
# holds once the stop, the trial's last event, is applied), with the same exact numeric arithmetic.
COMPARISON_FROM_TRIALS = f"""
SELECT CASE WHEN GROUPING(model_run_id) = 1 THEN '{OVERALL}' ELSE model_run_id END AS model_run_id,
       spectral_norm, status, count(*) AS trials, {", ".join(map(_aggregates, STATS))}
FROM (SELECT model_run_id, spectral_norm, status,
             (metrics->>'final_val_accuracy')::numeric AS val,
             (metrics->>'final_train_accuracy')::numeric - (metrics->>'final_val_accuracy')::numeric AS gap,
             (metrics->>'duration_ms')::numeric AS duration
      FROM trials WHERE status <> 'running') AS finished
GROUP BY GROUPING SETS ((model_run_id, spectral_norm, status), (spectral_norm, status))
"""

COMPARISON_COLUMNS = ("model_run_id", "spectral_norm", "status", "trials",
                      *(f"{s}_{part}" for s in STATS for part in ("n", "sum", "sum_sq", "min", "max")))

# The per-arm rows the report reads for its counts and summaries ($1 = model_run_id or '*').
REPORT_AGGREGATES = f"""
SELECT spectral_norm, status, trials,
       {", ".join(f"{s}_n, {s}_sum::float8, {s}_sum_sq::float8, {s}_min::float8, {s}_max::float8" for s in STATS)}
FROM sn_comparison
WHERE model_run_id = $1
"""

# A scope over every search leaves out the archived ones (`sntrack studies delete NAME`); naming one still reports it.
NOT_ARCHIVED = "($1::text IS NOT NULL OR {column} NOT IN (SELECT model_run_id FROM archived_studies))"

# Which trials the report compares ($1 model_run_id, $2 dataset; NULL = any), in their id order: the reads of
# trials below share it, so that their arrays line up.
_TRIALS_IN_SCOPE = f"""
      FROM trials
      WHERE ($1::text IS NULL OR model_run_id = $1) AND ($2::text IS NULL OR dataset = $2)
        AND {NOT_ARCHIVED.format(column="model_run_id")}
      ORDER BY id"""

# The trials the report compares, with the final measurements of their stop, as one row of arrays (an aggregate
# reads a sorted subquery in its order): a column per field of consumers.report.snapshot.TRIAL_FIELDS, in order,
# without hyper-parameters and σ (REPORT_TRIAL_JSON); NULL when no trial is in scope. Arrays decode without a record
# per trial: a third of the client's time for rows. Migration 014 keeps the columns it reads ready.
REPORT_TRIALS = f"""
SELECT array_agg(id) AS id, array_agg(spectral_norm) AS spectral_norm, array_agg(status) AS status,
       array_agg(final_val_accuracy) AS val, array_agg(final_train_accuracy) AS train,
       array_agg(final_duration_ms) AS duration_ms, array_agg(paired_with) AS paired_with,
       array_agg(model_run_id) AS model_run_id, array_agg(dataset) AS dataset, array_agg(epochs_to_95) AS epochs_to_95
FROM (SELECT id, spectral_norm, status, final_val_accuracy, final_train_accuracy, final_duration_ms, paired_with,
             model_run_id, dataset, CASE WHEN status = 'completed' THEN epochs_to_95 END AS epochs_to_95
{_TRIALS_IN_SCOPE}) AS trial
"""

# The same trials' hyper-parameters and last σ, as JSON texts: 16 of the 28 MB the two reads send for 100,000 trials,
# and about 40% of the server's time; read on a second connection meanwhile (consumers.report.snapshot.load).
REPORT_TRIAL_JSON = f"""
SELECT array_agg(hyperparams_text) AS hyperparams, array_agg(sigmas) AS sigmas
FROM (SELECT hyperparams_text, CASE WHEN status = 'completed' THEN last_sigmas_text END AS sigmas
{_TRIALS_IN_SCOPE}) AS trial
"""

# Mean validation accuracy per epoch and arm over completed trials, with what its 95% band needs, and the mean
# wall-clock time from the trial's start to the end of that epoch (the learning curve at equal compute).
REPORT_CURVES = f"""
SELECT t.spectral_norm, m.epoch, count(m.val_accuracy) AS n, avg(m.val_accuracy) AS mean,
       stddev_samp(m.val_accuracy) AS std, avg(extract(epoch FROM m.occurred_at - t.started_at))::float8 AS elapsed_s
FROM trial_metrics m JOIN trials t ON t.id = m.trial_id
WHERE t.status = 'completed' AND ($1::text IS NULL OR t.model_run_id = $1) AND ($2::text IS NULL OR t.dataset = $2)
  AND {NOT_ARCHIVED.format(column="t.model_run_id")}
GROUP BY t.spectral_norm, m.epoch
ORDER BY t.spectral_norm, m.epoch
"""

# How many trials the journal holds for a search (their start events): compared with the read model, it tells
# whether the consumers are behind. Index events_model_run.
JOURNAL_TRIALS = f"""
SELECT count(*) FROM events WHERE ($1::text IS NULL OR model_run_id = $1) AND event_type = 'ml.run.start'
  AND {NOT_ARCHIVED.format(column="model_run_id")}
"""

# Every search and dataset a user could mean, for "did you mean" on an unknown --run / --dataset.
KNOWN_SEARCHES = "SELECT model_run_id FROM trials UNION SELECT model_run_id FROM events"
READ_MODEL_SEARCHES = "SELECT DISTINCT model_run_id FROM trials"
KNOWN_DATASETS = "SELECT DISTINCT dataset FROM trials WHERE dataset IS NOT NULL"
