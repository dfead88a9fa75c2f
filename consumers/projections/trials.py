"""The Trial read model: `trials` (one row per trial) and `trial_metrics` (its learning curve).

Every clause is an order-independent upsert: start fills the configuration, stop the outcome, metrics the
curve; timestamps come from the events (not the clock) so a replay reproduces the live rows exactly.
Metric events touch only `trial_metrics` while their trial runs: updating the trial's row once per epoch made every
epoch rewrite the same hot row, which halved replay speed (progress of a running trial is max(epoch) in
trial_metrics). Once it has stopped, the row keeps the summary of its curve the report reads (_epochs_to_95,
_last_sigmas), which a late metric updates.
"""

from __future__ import annotations

from consumers.projections.base import Projection, Statement, jsonb
from consumers.topology import QueueSpec
from schemas import Event, RunMetric, RunStarted, RunStopped
from schemas.topology import RUN_METRIC, RUN_START, RUN_STOP

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
    spectral_norm = CASE WHEN t.finished_at IS NULL THEN EXCLUDED.spectral_norm ELSE t.spectral_norm END,
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

# The trial's summary, kept on its row once it has stopped so that `sntrack report` reads no curve: the epochs it took
# to reach 95% of its final validation accuracy (counted from 1) and the per-layer σ of its last measured epoch.
# `curve` is a relation of the trial's trial_metrics rows, `final` the jsonb of its stop's measurements. Every
# writer of a stopped trial's curve or outcome recomputes both: UPSERT_STOP, UPSERT_CURVE and BULK_TRIALS.
def _epochs_to_95(curve: str, final: str) -> str:
    return (f"(SELECT min(c.epoch)::bigint + 1 FROM {curve} c "  # bigint: an epoch may be 2^31 - 1
            f"WHERE c.val_accuracy >= 0.95 * ({final} ->> 'final_val_accuracy')::double precision)")


def _last_sigmas(curve: str) -> str:
    return f"(SELECT c.spectral_norms FROM {curve} c ORDER BY c.epoch DESC LIMIT 1)"


_CURVE_OF_1 = "(SELECT epoch, val_accuracy, spectral_norms FROM trial_metrics WHERE trial_id = $1)"  # the stop's


# The metric, then the summary of its trial if the trial has stopped and the metric changed its curve. The statement
# sees trial_metrics as it was before the upsert: its curve is that, with the upserted row in place of its epoch.
UPSERT_CURVE = f"""
WITH up AS (
INSERT INTO trial_metrics AS m (trial_id, epoch, seq, train_loss, val_loss, train_accuracy, val_accuracy,
                                measurements, spectral_norms, occurred_at, step)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11)
ON CONFLICT (trial_id, epoch) DO UPDATE SET
    seq = EXCLUDED.seq, train_loss = EXCLUDED.train_loss, val_loss = EXCLUDED.val_loss,
    train_accuracy = EXCLUDED.train_accuracy, val_accuracy = EXCLUDED.val_accuracy,
    measurements = EXCLUDED.measurements, spectral_norms = EXCLUDED.spectral_norms,
    occurred_at = EXCLUDED.occurred_at, step = EXCLUDED.step
WHERE m.seq < EXCLUDED.seq
RETURNING m.epoch, m.val_accuracy, m.spectral_norms
), curve AS (
    SELECT epoch, val_accuracy, spectral_norms FROM trial_metrics WHERE trial_id = $1 AND epoch <> $2
    UNION ALL
    SELECT epoch, val_accuracy, spectral_norms FROM up
)
UPDATE trials t SET epochs_to_95 = {_epochs_to_95("curve", "t.metrics")}, last_sigmas = {_last_sigmas("curve")}
WHERE t.id = $1 AND t.finished_at IS NOT NULL AND EXISTS (SELECT 1 FROM up)
"""

# A trial can have two stops: its worker made its stop durable and was killed before telling Optuna, and another
# worker then reported it lost (worker_lost, a higher seq). The stop with the highest seq wins whatever the order,
# its flag included: a start applied after a stop keeps the stop's flag (UPSERT_START), so a stop whose flag differs
# from its start's gives the same row in any order.
_STOP_WINS = "(t.finished_at IS NULL OR EXCLUDED.last_seq >= t.last_seq)"
_STOP_COLUMNS = ",\n".join(
    f"    {column} = CASE WHEN {_STOP_WINS} THEN EXCLUDED.{column} ELSE t.{column} END"
    for column in ("spectral_norm", "status", "metrics", "duration_ms", "error_type", "error_message", "finished_at")
)

UPSERT_STOP = f"""
INSERT INTO trials AS t (id, model_run_id, spectral_norm, status, metrics, duration_ms, error_type, error_message,
                         finished_at, last_seq, inserted_at, updated_at, epochs_to_95, last_sigmas)
VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9, $10, $9, $9, {_epochs_to_95(_CURVE_OF_1, "$5::jsonb")},
        {_last_sigmas(_CURVE_OF_1)})
ON CONFLICT (id) DO UPDATE SET
{_STOP_COLUMNS},
    epochs_to_95 = {_epochs_to_95(_CURVE_OF_1, f"(CASE WHEN {_STOP_WINS} THEN EXCLUDED.metrics ELSE t.metrics END)")},
    last_sigmas = EXCLUDED.last_sigmas,
{_KEEP_TIMES}
"""


# The set-based rebuild (consumers/bulk.py): the rows `project` gives applied in position order. Per trial, the last
# start by position sets the configuration; the stop with the highest seq (the later one on a tie) sets the outcome
# and the flag; times span all of the trial's starts and stops; mlflow_run_id is the last one a start carried.
# A new `trials` column is one more line in UPSERT_START or UPSERT_STOP above and the matching expression on `s` (the
# start) or `z` (the stop) here; one derived from metrics, an aggregate over them joined on trial_id (`summaries`:
# BULK_CURVES has filled trial_metrics when this runs).
BULK_TRIALS = """
INSERT INTO trials (id, model_run_id, spectral_norm, status, mlflow_run_id, hyperparams, metrics, dataset, model, seed,
                    optuna_trial_number, paired_with, epochs, duration_ms, error_type, error_message, last_seq,
                    started_at, finished_at, inserted_at, updated_at, epochs_to_95, last_sigmas)
WITH touched AS MATERIALIZED (
    SELECT e.position, e.event_type = 'ml.run.start' AS is_start, e.trial_id, e.model_run_id, e.seq, e.occurred_at,
           e.envelope -> 'payload' AS p
    FROM {journal} e WHERE e.event_type IN ('ml.run.start', 'ml.run.stop')
), starts AS (
    SELECT DISTINCT ON (trial_id) * FROM touched WHERE is_start ORDER BY trial_id, position DESC
), stops AS (
    SELECT DISTINCT ON (trial_id) * FROM touched WHERE NOT is_start ORDER BY trial_id, seq DESC, position DESC
), spans AS (
    SELECT trial_id, min(occurred_at) AS first_at, max(occurred_at) AS last_at,
           (array_agg(model_run_id ORDER BY position) FILTER (WHERE NOT is_start))[1] AS stop_run,
           (array_agg(p ->> 'mlflow_run_id' ORDER BY position DESC)
                FILTER (WHERE is_start AND p ->> 'mlflow_run_id' IS NOT NULL))[1] AS mlflow_run_id
    FROM touched GROUP BY trial_id
), summaries AS (  -- _epochs_to_95 and _last_sigmas, over every stopped trial at once
    SELECT m.trial_id, (min(m.epoch) FILTER (
               WHERE m.val_accuracy >= 0.95 * (z.p -> 'measurements' ->> 'final_val_accuracy')::double precision
           ))::bigint + 1 AS epochs_to_95,
           (array_agg(m.spectral_norms ORDER BY m.epoch DESC))[1] AS last_sigmas
    FROM trial_metrics m JOIN stops z USING (trial_id) GROUP BY m.trial_id
)
SELECT t.trial_id, COALESCE(s.model_run_id, t.stop_run),
       COALESCE(z.p ->> 'spectral_norm', s.p ->> 'spectral_norm')::boolean,
       COALESCE(z.p ->> 'status', 'running'), t.mlflow_run_id,
       COALESCE(s.p -> 'hyperparams', '{}'), COALESCE(z.p -> 'measurements', '{}'),
       s.p ->> 'dataset', s.p ->> 'model', (s.p ->> 'seed')::bigint, (s.p ->> 'optuna_trial_number')::integer,
       s.p ->> 'paired_with',
       -- _epochs: an integer only; jsonb prints a float with a decimal point (5.0), never with an exponent
       CASE WHEN jsonb_typeof(s.p -> 'hyperparams' -> 'epochs') = 'number'
                 AND strpos(s.p -> 'hyperparams' ->> 'epochs', '.') = 0
            THEN (s.p -> 'hyperparams' ->> 'epochs')::integer END,
       (z.p -> 'measurements' ->> 'duration_ms')::double precision,
       z.p -> 'error' ->> 'type', z.p -> 'error' ->> 'message',
       COALESCE(z.seq, 0), s.occurred_at, z.occurred_at, t.first_at, t.last_at, y.epochs_to_95, y.last_sigmas
FROM spans t LEFT JOIN starts s USING (trial_id) LEFT JOIN stops z USING (trial_id)
LEFT JOIN summaries y USING (trial_id)
"""

# Per (trial, epoch) the metric with the highest seq, the earlier one on a tie (UPSERT_CURVE overwrites only a lower
# seq). Version 1 carried the flat measurements; version 2 flattens its splits as `<split>_<name>` over them
# (MetricPayload.flat_measurements). jsonb 'null' is SQL NULL as `project` writes None.
BULK_CURVES = """
INSERT INTO trial_metrics (trial_id, epoch, seq, train_loss, val_loss, train_accuracy, val_accuracy, measurements,
                           spectral_norms, occurred_at, step)
SELECT trial_id, epoch, seq, (m ->> 'train_loss')::double precision, (m ->> 'val_loss')::double precision,
       (m ->> 'train_accuracy')::double precision, (m ->> 'val_accuracy')::double precision, m,
       NULLIF(p -> 'spectral_norms', 'null'), occurred_at, (p ->> 'step')::bigint
FROM (
    SELECT DISTINCT ON (e.trial_id, (e.envelope -> 'payload' ->> 'epoch')::integer)
           e.trial_id, (e.envelope -> 'payload' ->> 'epoch')::integer AS epoch, e.seq, e.occurred_at,
           e.schema_version, e.envelope -> 'payload' AS p
    FROM {journal} e WHERE e.event_type = 'ml.run.metric'
    ORDER BY e.trial_id, (e.envelope -> 'payload' ->> 'epoch')::integer, e.seq DESC, e.position
) w CROSS JOIN LATERAL (
    SELECT COALESCE(p -> 'measurements', '{}') || CASE WHEN w.schema_version = 1 THEN '{}' ELSE COALESCE(
        (SELECT jsonb_object_agg(s.key || '_' || v.key, v.value)
         FROM jsonb_each(p -> 'splits') s CROSS JOIN LATERAL jsonb_each(s.value) v), '{}') END AS m
    OFFSET 0  -- flattened once per row, not once per column that reads it
) f
"""


def _epochs(hyperparams: dict) -> int | None:
    value = hyperparams.get("epochs")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TrialsProjection(Projection):
    name = "trials"
    queue = QueueSpec("sntrack.trials")
    tables = ("trial_metrics", "trials")
    bulk = (BULK_CURVES, BULK_TRIALS)
    bulk_versions = {RUN_START: frozenset({1}), RUN_METRIC: frozenset({1, 2}), RUN_STOP: frozenset({1})}
    # UPSERT_CURVE keeps the highest seq and leaves a tie alone: a metric applied again changes nothing, whatever
    # came between. A start is not (the last one applied sets the configuration), so its row is kept.
    idempotent_types = frozenset({RUN_METRIC})
    locks_trials = True  # a stop and a late metric read the trial's curve and outcome

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

